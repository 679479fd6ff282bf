"""A model folder's layout and its `model.json`, without torch: what register and other light readers need.

`stages.model` writes and serves the folder; its docstring describes what each file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.hub import check_unchanged, resolve_backbone

MODEL_JSON = "model.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"
NGRAM_DIR = "ngram"


def write_info(folder: Path, info: dict[str, Any]) -> None:
    (folder / MODEL_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def read_info(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MODEL_JSON).read_text(encoding="utf-8"))


def encoder_path(folder: Path) -> str:
    """The encoder a model folder runs: its own fine-tuned copy, or the backbone (at the commit recorded when it
    was trained) that a linear probe names."""
    if (Path(folder) / ENCODER_DIR).is_dir():
        return str(Path(folder) / ENCODER_DIR)
    info = read_info(folder)
    check_unchanged(info["backbone"], info.get("backbone_sha256"), f"the linear probe in {folder}")
    return resolve_backbone(info["backbone"], info.get("backbone_revision"))
