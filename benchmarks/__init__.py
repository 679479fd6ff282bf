"""Benchmarks that measure the pipeline against peer libraries on the project's own data."""

from pathlib import Path
from typing import Any

from stages.io import write_json


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (an existing params.yaml key, e.g. fine_tune.finetune.epochs) in `data` to `value`."""
    *parents, leaf = key.split(".")
    section: Any = data
    for part in parents:
        section = section.get(part) if isinstance(section, dict) else None
    if not isinstance(section, dict) or leaf not in section:
        raise SystemExit(f"--set/--grid {key}: params.yaml has no key {key!r}")
    section[leaf] = value


def write_report(record: Any, path: Path) -> None:
    """The `--out` file every benchmark writes: indented JSON, written atomically."""
    write_json(record, path)
    print(f"wrote {path}")
