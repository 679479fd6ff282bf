"""Blank values and the rows that hold them, named for an error message. The served model imports this module,
so it ships with every registered version: keep it small and free of the pipeline's other modules."""

from __future__ import annotations

import pandas as pd


def blank(values: pd.Series) -> pd.Series:
    """Which values are null, empty or only spaces."""
    return values.isna() | (values.astype(str).str.strip() == "")


def bad_rows(mask: pd.Series, places: tuple[str, list[str]] | None) -> str:
    """The rows `mask` flags, named by `row_places`, else as 0-based data rows (Parquet's, or a CSV's counted after
    its header)."""
    kind, names = places or ("row(s) (0-based, not counting a header)", [str(i) for i in range(len(mask))])
    flagged = [names[i] for i in mask[mask].index[:5]]
    more = f" and {int(mask.sum()) - len(flagged)} more" if mask.sum() > len(flagged) else ""
    return f"{kind} {', '.join(flagged)}{more}"
