"""The one error type a user sees: it says what is wrong, where, and what to do."""


class PipelineError(Exception):
    """Bad input or configuration; the message is meant for the user as-is."""
