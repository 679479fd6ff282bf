"""Benchmarks that measure the pipeline against peer libraries on the project's own data."""

from pathlib import Path
from typing import Any

from stages.io import write_json


def write_report(record: Any, path: Path) -> None:
    """The `--out` file every benchmark writes: indented JSON, written atomically."""
    write_json(record, path)
    print(f"wrote {path}")
