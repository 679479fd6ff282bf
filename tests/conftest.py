"""Shared fixtures: a tiny slice of the real default data, the real backbone, real tools (DVC, MLflow, Prefect)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stages.config import Params, load_params
from stages.io import offline_env

ROOT = Path(__file__).resolve().parents[1]
TINY_CSV = ROOT / "tests" / "data" / "tiny_sentiment.csv"  # 280 rows of the Hutto & Gilbert data (MIT)
PROJECT_FILES = ["stages", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", "pyproject.toml", ".dvc/config",
                 ".dvc/.gitignore", ".dvc/plots", ".dvcignore", ".gitignore"]

os.environ.update(offline_env(dict(os.environ)))
# `dvc exp run` and the tests' own commits need a git identity; CI machines may have none configured.
for _var, _value in {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
                     "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}.items():
    os.environ.setdefault(_var, _value)
REPO_PARAMS = load_params(ROOT / "params.yaml")
# What fine_tune scored and what the saved model serves are one computation: exact fp32 on CPU; on CUDA bf16 autocast,
# where batches of another composition round differently (up to 7.5e-3 in probability on an H100; reports/gpu.json).
SERVED_ATOL = 1e-2 if torch.cuda.is_available() else 1e-4


def registry_client(uri: str) -> Any:
    """A client bound to `uri` for tracking and registry both (never to a URI another test set globally)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def repo_cfg(section: str, **updates: object) -> Any:
    """A section of the repo's params.yaml with `updates` applied: tests start from what ships."""
    return getattr(REPO_PARAMS, section).model_copy(update=updates)


def tiny_overrides(root: Path) -> dict:
    """Params for a fast run on the tiny CSV: linear probe by default, lenient gate thresholds."""
    return {
        "data": {"source": str(TINY_CSV), "format": "auto", "text_column": "text", "label_column": "label",
                 "domain_column": "domain"},
        "preprocess": {"test_size": 0.25, "val_size": 0.15},
        "backbone": {"max_length": 64},
        "fine_tune": {"strategy": "linear_probe", "linear_probe": {"C": 10.0},
                      "finetune": {"epochs": 1, "min_steps": 0, "batch_size": 16, "max_length": 48}},
        "register": {"min_accuracy": 0.5, "min_macro_f1": 0.4},
        "deploy": {"startup_timeout_s": 120},
        "data_efficiency": {"labels_per_class": [4, 8, None], "seeds": [0, 1], "strategy": "linear_probe"},
        "adapt": {"labels_per_class": 4, "seeds": [0], "steps": 4, "unlabeled_fraction": 0.5, "self_training_steps": 4,
                  "self_training_confidence": 0.0},
    }


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def write_params(root: Path, overrides: dict) -> Params:
    """params.yaml of the repo with `overrides` applied, written to `root`, with paths under `root`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(root / "params.yaml")


@pytest.fixture
def tiny_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    """Validated params for the tiny data, with the working directory set to a fresh tmp project."""
    monkeypatch.chdir(tmp_path)
    return write_params(tmp_path, tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def tiny_frame() -> pd.DataFrame:
    from stages.ingest import ingest

    return ingest(repo_cfg("data", source=TINY_CSV, format="auto", domain_column="domain"))


@pytest.fixture(scope="session")
def tiny_splits(tiny_frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    from stages.preprocess import preprocess

    splits, mapping, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"], test_size=0.25,
                                                        val_size=0.15))
    return splits, mapping


@pytest.fixture(scope="session")
def tiny_features(tiny_splits: tuple[pd.DataFrame, dict[str, int]]) -> np.ndarray:
    from stages.extract_features import extract_features

    vectors, _ = extract_features(tiny_splits[0]["text"].tolist(), repo_cfg("backbone", max_length=64),
                                  repo_cfg("extract_features"), "linear_probe")
    return vectors


def self_training_on(params: Params) -> Params:
    """`params` with LP-FT and one epoch of self-training that keeps every pseudo-label (tiny data: few are sure)."""
    fine = params.fine_tune.model_copy(update={
        "strategy": "finetune",
        "self_training": params.fine_tune.self_training.model_copy(update={"epochs": 1, "confidence": 0.0})})
    return params.model_copy(update={"fine_tune": fine})


def with_blend(params: Params, weights: list[float]) -> Params:
    """`params` with fine_tune.blend.weights set: [w] forces a blend of weight w, [0.0] turns it off."""
    ft = params.fine_tune
    return params.model_copy(update={"fine_tune": ft.model_copy(update={
        "blend": ft.blend.model_copy(update={"weights": weights})})})


@pytest.fixture
def trained(tiny_params: Params, tiny_splits: tuple, tiny_features: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tiny project after fine_tune: splits, a saved candidate (linear probe, blended with the n-gram model)
    and its predictions."""
    from stages.fine_tune import fine_tune
    from stages.io import write_parquet

    splits = tiny_splits[0]
    predictions, _, _ = fine_tune(with_blend(tiny_params, [0.5]), splits, tiny_features, ["negative", "positive"],
                                  tiny_params.paths.model)
    write_parquet(splits, tiny_params.paths.splits)
    write_parquet(predictions, tiny_params.paths.predictions)
    return splits, predictions


def drop_labels(splits: pd.DataFrame, rows: pd.Index) -> pd.DataFrame:
    """A copy of `splits` where `rows` are unlabelled text, as preprocess keeps a source row with an empty label."""
    from stages.preprocess import UNLABELED

    splits = splits.copy()
    splits.loc[rows, ["label", "label_id", "split"]] = (None, -1, UNLABELED)
    return splits


@pytest.fixture
def trained_texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text any training pass trains on (LP-FT, adaptation, self-training), recorded by wrapping the loop."""
    from stages import finetune_loop

    seen: list[str] = []
    real_finetune = finetune_loop.finetune

    def spy(encoder, tokenizer, head, cfg, train, val, seed):
        seen.extend(train[0])
        assert (np.asarray(train[1]) >= 0).all()  # a pool row's missing label (-1) never reaches the loss
        return real_finetune(encoder, tokenizer, head, cfg, train, val, seed)

    monkeypatch.setattr(finetune_loop, "finetune", spy)
    return seen


@pytest.fixture
def sigint_reaches_children() -> Iterator[None]:
    """Children started in the test see Ctrl-C: a test run started in the background has SIGINT ignored, and an
    ignored signal stays ignored in every process it starts (a handled one is reset to the default)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC project holding this repo's code, params for the tiny data, and its own MLflow db."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / "data").mkdir(exist_ok=True)
    shutil.copy2(TINY_CSV, root / "data" / TINY_CSV.name)
    # end-to-end runs serve a blended model, so the n-gram part goes through MLflow, serving and the gate too
    local_source = {"data": {"source": f"data/{TINY_CSV.name}"}, "fine_tune": {"blend": {"weights": [0.5]}}}
    write_params(root, merge(merge(tiny_overrides(root), local_source), overrides or {}))
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=root, check=True)
    return root


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uris_stay_per_test() -> Iterator[None]:
    """`mlflow.set_tracking_uri` / `set_registry_uri` also write os.environ: a stage run in-process must not point the
    next test's subprocesses at its registry."""
    before = {name: os.environ.get(name) for name in MLFLOW_URI_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def project_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"}  # the registry is the tracking db
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], root: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, check=False, cwd=root, env=project_env(root), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n"
                             f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project on which `dvc repro` ran the whole DAG once."""
    root = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    run([sys.executable, "-m", "dvc", "repro"], root)
    return root


def set_param(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def relocate_registry(root: Path, old_root: Path) -> None:
    """Point the copied MLflow db of `root` (a copy of `old_root`, `mlruns` included) at its own artifacts: the db
    and the MLmodel files hold absolute paths into `old_root`."""
    import sqlite3
    from contextlib import closing

    old, new = f"{old_root}/", f"{root}/"
    with closing(sqlite3.connect(root / "mlflow.db")) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = [(table, column) for table in tables
                   for _, column, kind, *_ in db.execute(f"PRAGMA table_info('{table}')") if "CHAR" in kind.upper()
                   or "TEXT" in kind.upper()]
        for table, column in columns:
            db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                       (old, new, old))
        left = [(t, c) for t, c in columns
                if db.execute(f'SELECT count(*) FROM "{t}" WHERE instr("{c}", ?) > 0', (str(old_root),)).fetchone()[0]]
    for mlmodel in (root / "mlruns").rglob("MLmodel"):
        mlmodel.write_text(mlmodel.read_text().replace(old, new))
    assert not left, f"MLflow columns still pointing into {old_root}: {left}"


def copy_project(source: Path, root: Path) -> Path:
    """A copy of a reproduced project whose MLflow runs, registry and artifacts are its own: what the copy registers
    or damages never lands in `source`'s `mlruns`."""
    shutil.copytree(source, root)
    relocate_registry(root, source)
    return root


@pytest.fixture
def registered(pipeline_project: Path, tmp_path: Path) -> Path:
    """A copy of the pipeline project with its own registry and artifacts, where `dvc repro` registered the model as
    version 1 and made it @champion: a test may damage what is registered without touching the shared project."""
    return copy_project(pipeline_project, tmp_path / "copy")
