"""register: log the run to MLflow, register the pyfunc, gate it against baseline and champion, set aliases."""

from __future__ import annotations

import re
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from stages.backbone import resolve_backbone
from stages.config import Params, load_params
from stages.errors import PipelineError
from stages.io import log, read_json, remove_outputs, run_main, write_json
from stages.model import ENCODER_DIR, read_info
from stages.ngram import UNBLENDED
from stages.registry import (
    CHAMPION,
    alias_version,
    apply_decision,
    configure_mlflow,
    decide,
    dvc_hashes,
    git_commit,
    orchestration_tags,
)

SERVING_CODE = Path(__file__).with_name("serving.py")
RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "pandas", "numpy", "scikit-learn", "mlflow")


def signature(labels: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "label")] + [ColSpec("double", f"prob_{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


def flatten(prefix: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else str(key), sub).items()}
    return {prefix: value}


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits and `_-. /:`; user domain names may hold anything."""
    return re.sub(r"[^\w.\- /:]", "_", key)


def log_model(model_dir: Path, labels: list[str], example: list[str]) -> mlflow.models.model.ModelInfo:
    artifacts = {"model": str(model_dir)}
    if not (model_dir / ENCODER_DIR).is_dir():  # a linear probe: ship the frozen backbone with it
        artifacts["encoder"] = resolve_backbone(read_info(model_dir)["backbone"])
    requirements = [f"{p}=={package_version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(SERVING_CODE), artifacts=artifacts,
        code_paths=[str(Path(__file__).parent)], signature=signature(labels),
        input_example=pd.DataFrame({"text": example}), pip_requirements=requirements)


def champion_accuracy(name: str, version: str | None, test: pd.DataFrame) -> float | None:
    """The current champion re-scored on this run's test split, so the comparison is like for like."""
    if version is None:
        return None
    try:
        champion = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    except Exception as error:  # whatever broke the load, the user needs the version and the way out
        raise PipelineError(
            f"register: the champion {name}@{CHAMPION} (version {version}) does not load with this checkout's code "
            f"({type(error).__name__}: {error}), so it cannot be re-scored for the gate; point the alias at a version "
            f"that loads (MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, <version>)) or delete "
            f"the alias to let this candidate become the first champion") from error
    predicted = champion.predict(pd.DataFrame({"text": test["text"].tolist()}))["label"].to_numpy()
    return float(np.mean(predicted == test["label"].to_numpy()))


def lineage(params: Params) -> dict[str, str]:
    hashes = dvc_hashes(Path("dvc.lock"), {"raw": params.paths.raw, "splits": params.paths.splits,
                                             "features": params.paths.features, "model": params.paths.model})
    tags = {"git_commit": git_commit(), "pipeline.stage": "register", "strategy": params.fine_tune.strategy,
            "backbone": params.backbone.name, "data.source": str(params.data.source)}
    return tags | {f"dvc.{k}": v for k, v in hashes.items()} | orchestration_tags()


def register(params: Params) -> dict:
    """Log, register and gate one candidate; return the decision record."""
    client = configure_mlflow()
    cfg, paths = params.register, params.paths
    evaluation = read_json(paths.evaluation)
    labels = read_json(paths.label_map)["labels"]
    splits = pd.read_parquet(paths.splits)
    test = splits[splits["split"] == "test"]
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(tags={MLFLOW_RUN_NAME: f"{params.fine_tune.strategy}"} | lineage(params)) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten("", params.model_dump(mode="json")).items()})
        mlflow.log_metrics({metric_key(k): float(v) for k, v in flatten("", read_json(paths.metrics)).items()})
        mlflow.log_metrics({f"train.{k}": float(v) for k, v in read_json(paths.training_metrics).items()})
        for path in (paths.evaluation, paths.data_report, paths.label_map, paths.model / "model.json"):
            mlflow.log_artifact(str(path), artifact_path="reports")
        mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
        # Everything that can fail comes before the registry is touched, so a retry never leaves a stray version.
        previous = alias_version(client, cfg.model_name, CHAMPION)
        candidate = evaluation["test"]["candidate"]
        champ_acc = champion_accuracy(cfg.model_name, previous, test)
        blended = read_info(paths.model).get("ngram_weight", 0) > 0
        decision = decide(candidate, evaluation["test"]["baseline"]["accuracy"], champ_acc, cfg,
                          transfer_accuracy=evaluation["test"][UNBLENDED]["accuracy"] if blended else None)
        info = log_model(paths.model, labels, test["text"].head(3).tolist())
        tags = lineage(params) | {"run_id": run.info.run_id}
        registered = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
        version = str(registered.version)
        apply_decision(client, cfg.model_name, version, decision, previous)
        mlflow.set_tags({"gate.decision": "promoted" if decision.promote else "rejected",
                         "registered_version": version})
    return {
        "model_name": cfg.model_name, "version": version, "run_id": run.info.run_id,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "decision": "promoted" if decision.promote else "rejected", "reasons": decision.reasons,
        "candidate_accuracy": candidate["accuracy"], "baseline_accuracy": evaluation["test"]["baseline"]["accuracy"],
        "champion_accuracy": champ_acc, "previous_champion": previous,
        "champion": alias_version(client, cfg.model_name, CHAMPION),
    }


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.registry)
    record = register(params)
    write_json(record, params.paths.registry)
    log.info("register: version %s %s: %s", record["version"], record["decision"], "; ".join(record["reasons"]))


if __name__ == "__main__":
    run_main(main)
