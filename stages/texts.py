"""Text as the pipeline reads it: the normalisation ingest applies to every text and the served model to every
request (so both see the same text), and blank values and the rows that hold them, named for an error message.
The served model imports this module, so it ships with every registered version: keep it free of the pipeline's
other modules."""

from __future__ import annotations

import html
import re
import unicodedata

import pandas as pd

_SPACES = re.compile(r"[ \t\u00a0]+")


def normalise_text(text: str) -> str:
    for _ in range(3):  # some sources escape twice ("&amp;amp;")
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _SPACES.sub(" ", text).strip()


INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}  # control, format (zero-width), and separator characters


def blank(values: pd.Series) -> pd.Series:
    """Which values are null, or empty once normalised (`&nbsp;` is), or hold nothing but spaces and invisible
    characters (zero-width, control). Emoji, and characters newer than this Python's Unicode tables, are text."""
    visible = values.map(lambda value: _visible(normalise_text(str(value))), na_action="ignore")
    return values.isna() | ~visible.fillna(True).astype(bool)


def _visible(text: str) -> bool:
    return any(unicodedata.category(char) not in INVISIBLE and not char.isspace() for char in text)


def not_text(values: pd.Series) -> pd.Series:
    """Which values are not strings (numbers, lists, mappings: JSON allows them where text belongs); nulls are
    `blank`'s."""
    return values.notna() & ~values.map(lambda value: isinstance(value, str))


def bad_rows(mask: pd.Series, places: tuple[str, list[str]] | None) -> str:
    """The rows `mask` flags, named by `row_places`, else as 0-based data rows (Parquet's, or a CSV's counted after
    its header)."""
    kind, names = places or ("row(s) (0-based, not counting a header)", [str(i) for i in range(len(mask))])
    flagged = [names[i] for i in mask[mask].index[:5]]
    more = f" and {int(mask.sum()) - len(flagged)} more" if mask.sum() > len(flagged) else ""
    return f"{kind} {', '.join(flagged)}{more}"
