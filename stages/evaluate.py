"""evaluate: candidate vs no-transfer baseline on the test split and every held-out domain; metrics + plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from stages.config import load_params
from stages.io import atomic_path, load_features, log, read_json, remove_outputs, run_main, write_json
from stages.ngram import UNBLENDED
from stages.plots import write_plots

MODELS = ("candidate", "baseline")


def probabilities(predictions: pd.DataFrame, model: str) -> np.ndarray:
    columns = sorted((c for c in predictions.columns if c.startswith(f"{model}_p")), key=lambda c: int(c.rsplit("p", 1)[1]))
    return predictions[columns].to_numpy()


def calibration(y: np.ndarray, proba: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-class confidence, and the reliability-diagram bins."""
    confidence, correct = proba.max(axis=1), (proba.argmax(axis=1) == y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        conf, acc = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
        ece += in_bin.mean() * abs(conf - acc)
        table.append({"bin": b, "confidence": round(conf, 4), "accuracy": round(acc, 4), "count": int(in_bin.sum())})
    return float(ece), table


def score(y: np.ndarray, proba: np.ndarray, labels: list[str], bins: int) -> dict:
    predicted = proba.argmax(axis=1)
    ids = list(range(len(labels)))
    precision, recall, _, support = precision_recall_fscore_support(y, predicted, labels=ids, zero_division=0)
    ece, reliability = calibration(y, proba, bins)
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "macro_f1": float(f1_score(y, predicted, labels=ids, average="macro", zero_division=0)),
        "ece": ece,
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
                      for i in ids},
        "confusion_matrix": confusion_matrix(y, predicted, labels=ids).tolist(),
        "reliability": reliability,
    }


def compare(group: pd.DataFrame, labels: list[str], bins: int) -> dict:
    y = group["label_id"].to_numpy()
    blended = f"{UNBLENDED}_p0" in group.columns
    models = [*MODELS, UNBLENDED] if blended else list(MODELS)
    result = {model: score(y, probabilities(group, model), labels, bins) for model in models}
    # The transfer gain is the transferred model's alone: a blend with the baseline must not hide negative transfer.
    transfer = result[UNBLENDED if blended else "candidate"]
    gain = {k: transfer[k] - result["baseline"][k] for k in ("accuracy", "macro_f1")}
    return result | {"rows": len(group), "transfer_gain": gain, "negative_transfer": bool(gain["accuracy"] < 0)}


def domain_distance(features: np.ndarray, splits: pd.DataFrame, domain: str) -> float:
    """Cosine distance between the training domain's and `domain`'s mean frozen embedding."""
    train = features[(splits["split"] == "train").to_numpy()].mean(axis=0)
    other = features[(splits["domain"] == domain).to_numpy() & (splits["split"] == "heldout").to_numpy()].mean(axis=0)
    return float(1.0 - train @ other / (np.linalg.norm(train) * np.linalg.norm(other)))


def evaluate(predictions: pd.DataFrame, splits: pd.DataFrame, features: np.ndarray, labels: list[str],
             bins: int) -> dict:
    """Full evaluation: `test` (in-domain) and one entry per held-out domain."""
    report = {"test": compare(predictions[predictions["split"] == "test"], labels, bins), "domains": {}}
    in_domain_accuracy = report["test"]["candidate"]["accuracy"]
    heldout = predictions[predictions["split"] == "heldout"]
    for domain, group in heldout.groupby("domain"):
        entry = compare(group, labels, bins)
        entry["shift"] = {"accuracy_drop": in_domain_accuracy - entry["candidate"]["accuracy"],
                          "embedding_distance": domain_distance(features, splits, str(domain))}
        report["domains"][str(domain)] = entry
    return report


def headline(entry: dict) -> dict:
    """The few numbers per group that `dvc metrics show` tabulates."""
    out = {f"{m}_{k}": round(entry[m][k], 4) for m in MODELS for k in ("accuracy", "macro_f1", "ece")}
    if UNBLENDED in entry:
        out[f"{UNBLENDED}_accuracy"] = round(entry[UNBLENDED]["accuracy"], 4)
    out |= {"transfer_gain": round(entry["transfer_gain"]["accuracy"], 4), "negative_transfer": entry["negative_transfer"]}
    if "shift" in entry:
        out |= {k: round(v, 4) for k, v in entry["shift"].items()}
    return out


def metrics_summary(report: dict) -> dict:
    return {"test": headline(report["test"]), "domains": {d: headline(e) for d, e in report["domains"].items()}}


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.metrics, params.paths.evaluation, params.paths.plots)
    predictions = pd.read_parquet(params.paths.predictions)
    splits = pd.read_parquet(params.paths.splits)
    labels = read_json(params.paths.label_map)["labels"]
    report = evaluate(predictions, splits, load_features(params.paths.features), labels,
                      params.evaluate.calibration_bins)
    with atomic_path(Path(params.paths.plots)) as folder:
        write_plots(report, labels, folder)
    write_json(report, params.paths.evaluation)
    write_json(metrics_summary(report), params.paths.metrics)
    log.info("evaluate: %s", metrics_summary(report)["test"])


if __name__ == "__main__":
    run_main(main)
