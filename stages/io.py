"""Atomic writes, cached features and the stage entry-point wrapper shared by every stage."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from stages.errors import PipelineError, RetryableError

log = logging.getLogger("stages")

# What extract_features caches in paths.features. Read here, without torch, so the stages that only read the
# features (evaluate, the studies) start in a second rather than six.
EMBEDDINGS_FILE = "embeddings.safetensors"
META_FILE = "meta.json"

# Nothing phones home: no hub downloads by default, no MLflow/Prefect/DVC telemetry. A value the user set wins.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}


def offline_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with OFFLINE_ENV filled in wherever the user did not set the variable."""
    return env | {k: v for k, v in OFFLINE_ENV.items() if k not in env}


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (file or folder); move it into place only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {target}")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(data: Any, target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(frame: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


def load_features(folder: Path) -> np.ndarray:
    return load_file(str(Path(folder) / EMBEDDINGS_FILE))["embeddings"]


def remove_outputs(*paths: Path) -> None:
    """Delete stale outputs so a failed stage never leaves a previous run's files looking current, and the
    temporary siblings (`atomic_path`) a killed run left behind."""
    for path in paths:
        path = Path(path)
        if path.parent.is_dir():
            temporary = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")  # tempfile.mkdtemp's names
            for leftover in path.parent.iterdir():
                if temporary.fullmatch(leftover.name) and leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(): user errors print one clear message and exit 2 (1 when a retry may help)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.update(offline_env(dict(os.environ)))
    # A stage stopped by a timeout (Prefect's, or `kill`) unwinds like an error, so atomic_path removes its
    # half-written temporary output; Python's default SIGTERM would end the process without running any `finally`.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        main()
    except RetryableError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: outputs already unwound by atomic_path; no traceback, the shell's 130
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
