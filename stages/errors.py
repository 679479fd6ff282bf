"""The one error type a user sees: it says what is wrong, where, and what to do."""


class PipelineError(Exception):
    """Bad input or configuration; the message is meant for the user as-is."""


class RetryableError(PipelineError):
    """Trouble outside the user's data, params and model (a server slow to start, a port in use): the stage exits 1,
    which the Prefect flow retries, where a PipelineError exits 2 and is not retried."""
