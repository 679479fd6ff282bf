"""adapt: few-shot domain adaptation of the candidate to each held-out domain, scored on rows never used for it.

Per held-out domain and seed, `adapt.labels_per_class` labelled rows per class are drawn from the domain; the
candidate (encoder and head, as fine_tune saved it) is trained on them for `adapt.steps` more steps, then scored
on every other row of that domain, next to the unadapted candidate and the no-transfer baseline on the same rows.
A negative gain is reported as negative transfer, never hidden.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from stages.backbone import load_encoder, select_device
from stages.config import Params, load_params
from stages.errors import PipelineError
from stages.evaluate import probabilities
from stages.finetune_loop import finetune
from stages.io import atomic_path, log, remove_outputs, run_main, write_json
from stages.model import ENCODER_DIR, classify, load_head, read_info
from stages.plots import plt, save_figure
from stages.preprocess import HELDOUT, take_per_class
from stages.registry import study_run

POINTS_CSV, PER_DOMAIN_CSV, PLOT_PNG = "points.csv", "per_domain.csv", "adaptation.png"


def draw_shots(domain: pd.DataFrame, per_class: int, seed: int, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labelled rows to adapt on, the rest of the domain to score on)."""
    counts = domain["label"].value_counts()
    if counts.min() <= per_class:
        raise PipelineError(f"adapt: domain {name!r} has only {counts.to_dict()} rows per label, not more than "
                            f"adapt.labels_per_class={per_class}; lower it so rows are left to score on")
    shots = take_per_class(domain, per_class, seed)
    return shots, domain.drop(shots.index)


def adapted_proba(params: Params, model_dir: Path, shots: pd.DataFrame, rest: pd.DataFrame, seed: int) -> np.ndarray:
    """Continue training the saved candidate on `shots`; return its probabilities on `rest`."""
    cfg, ft = params.adapt, params.fine_tune.finetune
    info = read_info(model_dir)
    encoder_name = str(model_dir / ENCODER_DIR) if (model_dir / ENCODER_DIR).is_dir() else info["backbone"]
    tokenizer, encoder = load_encoder(encoder_name, select_device())
    head = load_head(model_dir)
    steps_per_epoch = -(-len(shots) // ft.batch_size)
    loop = ft.model_copy(update={"epochs": -(-cfg.steps // steps_per_epoch), "min_steps": 0, "freeze_layers": 0,
                                 "learning_rate": cfg.learning_rate, "head_learning_rate_multiplier": 1.0})
    finetune(encoder, tokenizer, head, loop, (shots["text"].tolist(), shots["label_id"].to_numpy()), None, seed)
    return classify(encoder, tokenizer, head, rest["text"].tolist(), int(info["max_length"]), 2 * ft.batch_size)


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(axis=1) == y).mean())


def run_adaptation(params: Params, splits: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per (domain, seed): unadapted, adapted and baseline accuracy on the same unseen target rows."""
    cfg = params.adapt
    heldout = splits[splits["split"] == HELDOUT]
    if heldout.empty:
        raise PipelineError("adapt: no held-out domain to adapt to; set preprocess.train_domains so that some "
                            "domain is held out")
    candidate, baseline = probabilities(predictions, "candidate"), probabilities(predictions, "baseline")
    points = []
    for name, domain in heldout.groupby("domain", sort=True):
        for seed in cfg.seeds:
            shots, rest = draw_shots(domain, cfg.labels_per_class, seed, str(name))
            y = rest["label_id"].to_numpy()
            unadapted, adapted = accuracy(candidate[rest.index], y), accuracy(
                adapted_proba(params, params.paths.model, shots, rest, seed), y)
            points.append({"domain": name, "seed": seed, "shots": len(shots), "scored_rows": len(rest),
                           "unadapted_accuracy": unadapted, "adapted_accuracy": adapted, "gain": adapted - unadapted,
                           "baseline_accuracy": accuracy(baseline[rest.index], y),
                           "majority_accuracy": float(rest["label_id"].value_counts(normalize=True).max())})
            log.info("adapt: %s", points[-1])
    return pd.DataFrame(points)


def summarize(points: pd.DataFrame) -> pd.DataFrame:
    columns = ["unadapted_accuracy", "adapted_accuracy", "gain", "baseline_accuracy", "majority_accuracy"]
    per_domain = points.groupby("domain", sort=True)[columns].mean()
    per_domain["gain_std"] = points.groupby("domain", sort=True)["gain"].std(ddof=0)
    per_domain["negative_transfer"] = per_domain["gain"] < 0
    return per_domain.reset_index().round(4)


def plot_adaptation(per_domain: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(per_domain))
    bars = (("baseline_accuracy", "no-transfer baseline"), ("unadapted_accuracy", "transferred, unadapted"),
            ("adapted_accuracy", "transferred + few-shot adaptation"))
    for i, (column, label) in enumerate(bars):
        ax.bar(x + (i - 1) * 0.27, per_domain[column], width=0.27, label=label)
    ax.set(xticks=x, xticklabels=per_domain["domain"], ylim=(0.4, 1.0), ylabel="accuracy on unseen target rows",
           title="Few-shot domain adaptation")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def log_adaptation(params: Params, per_domain: pd.DataFrame, folder: Path) -> str:
    lineage = {"splits": params.paths.splits, "model": params.paths.model}
    with study_run(params.register.experiment, "adapt", "domain-adaptation", lineage) as run:
        mlflow.log_params(params.adapt.model_dump(mode="json"))
        for row in per_domain.itertuples():
            mlflow.log_metrics({f"{row.domain}.{k}": float(getattr(row, k))
                                for k in ("unadapted_accuracy", "adapted_accuracy", "gain", "baseline_accuracy")})
        mlflow.log_artifacts(str(folder), artifact_path="adaptation")
        return run.info.run_id


def adaptation_metrics(per_domain: pd.DataFrame) -> dict:
    return {row["domain"]: {k: row[k] for k in ("unadapted_accuracy", "adapted_accuracy", "gain", "baseline_accuracy",
                                                  "negative_transfer")}
            for row in per_domain.to_dict(orient="records")}


def main() -> None:
    params = load_params()
    paths = params.paths
    remove_outputs(paths.adaptation, paths.adaptation_metrics)
    splits = pd.read_parquet(paths.splits)
    predictions = pd.read_parquet(paths.predictions)
    if len(predictions) != len(splits):
        raise PipelineError(f"{paths.predictions} holds {len(predictions)} rows but {paths.splits} has "
                            f"{len(splits)}; run `dvc repro fine_tune`")
    points = run_adaptation(params, splits, predictions)
    per_domain = summarize(points)
    with atomic_path(paths.adaptation) as folder:
        folder.mkdir()
        points.round(4).to_csv(folder / POINTS_CSV, index=False)
        per_domain.to_csv(folder / PER_DOMAIN_CSV, index=False)
        plot_adaptation(per_domain, folder / PLOT_PNG)
        run_id = log_adaptation(params, per_domain, folder)
    write_json(adaptation_metrics(per_domain), paths.adaptation_metrics)
    log.info("adapt (MLflow run %s):\n%s", run_id, per_domain.to_string(index=False))


if __name__ == "__main__":
    run_main(main)
