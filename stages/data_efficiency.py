"""data_efficiency: accuracy of the transferred model vs the no-transfer baseline at several label budgets.

Each budget draws at most N training rows per class, once per seed, and trains both models on exactly those
rows; both are scored on the whole test split. A budget that takes every training row is drawn once (no
subsampling, so no seeds to average). Results go to a curve (CSV for `dvc plots`, PNG), a metrics file, and an
MLflow run whose metrics use the budget as their step, so MLflow charts the curve too.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from stages.config import Params, load_params
from stages.fine_tune import finetune_from_probe, fit_baseline, fit_probe, pinned_to_features, self_train_candidate
from stages.io import META_FILE, atomic_path, load_features, log, read_json, remove_outputs, run_main, write_json
from stages.model import classify, head_from_sklearn
from stages.plots import plt, save_figure
from stages.preprocess import in_domain_unlabeled, take_per_class
from stages.registry import study_run

POINTS_CSV, CURVE_CSV, CURVE_PNG = "points.csv", "curve.csv", "curve.png"
MODELS = ("transfer", "baseline")


def draws(train: pd.DataFrame, budget: int | None, seeds: list[int]) -> list[tuple[int, pd.DataFrame]]:
    """(seed, rows) per draw; a budget at or above every class's size is one draw of all rows."""
    largest = int(train["label"].value_counts().max())
    if budget is None or budget >= largest:
        return [(seeds[0], train)]
    return [(seed, take_per_class(train, budget, seed)) for seed in seeds]


def transfer_proba(params: Params, strategy: str, rows: pd.DataFrame, test: pd.DataFrame, features: np.ndarray,
                   seed: int, pool: list[str]) -> np.ndarray:
    """Test-split probabilities of the transferred model trained on `rows` only (no validation labels); with
    fine_tune.self_training, LP-FT then self-trains on `pool`, the training rows the draw left out (text only)."""
    y = rows["label_id"].to_numpy()
    probe = fit_probe(features[rows.index], y, params.fine_tune.linear_probe, seed)
    if strategy == "linear_probe":
        return probe.predict_proba(features[test.index])
    head = head_from_sklearn(probe.coef_, probe.intercept_)
    labelled = rows["text"].tolist(), y
    tokenizer, encoder, _ = finetune_from_probe(params, head, labelled, None, seed)
    if params.fine_tune.self_training.epochs and pool:
        self_train_candidate(params, encoder, tokenizer, head, labelled, pool, None, seed)
    ft = params.fine_tune.finetune
    return classify(encoder, tokenizer, head, test["text"].tolist(), ft.max_length, 2 * ft.batch_size)


def point(params: Params, strategy: str, rows: pd.DataFrame, test: pd.DataFrame, features: np.ndarray,
          seed: int, pool: list[str]) -> dict[str, float]:
    y = test["label_id"].to_numpy()
    baseline = fit_baseline(rows["text"].tolist(), rows["label_id"].to_numpy(), params.fine_tune.baseline, seed)
    predicted = {"transfer": transfer_proba(params, strategy, rows, test, features, seed, pool).argmax(axis=1),
                 "baseline": baseline.predict(test["text"].tolist())}
    out: dict[str, float] = {}
    for model, guess in predicted.items():
        out[f"{model}_accuracy"] = float(accuracy_score(y, guess))
        out[f"{model}_macro_f1"] = float(f1_score(y, guess, average="macro"))
    return out


def warn_capped_budgets(budgets: list[int | None], sizes: pd.Series) -> None:
    """Name the budgets that do not draw what they say: one at or above the largest class is every row (null), and
    one above the smallest class takes all of that class's rows."""
    largest, smallest = int(sizes.max()), int(sizes.min())
    if every := sorted(b for b in budgets if b is not None and b >= largest):
        log.warning("data_efficiency: labels_per_class %s: the largest class has %d training rows, so %s every "
                    "training row, the same point as null (key \"all\")", every, largest,
                    "this is" if len(every) == 1 else "each is")
    if short := sorted(b for b in budgets if b is not None and smallest < b < largest):
        small = ", ".join(f"{label!r} ({n})" for label, n in sizes.items() if n < short[-1])
        log.warning("data_efficiency: labels_per_class %s: fewer training rows than that in class(es) %s, which "
                    "give all their rows at those budgets", short, small)


def run_curve(params: Params, splits: pd.DataFrame, features: np.ndarray, scored_split: str = "test") -> pd.DataFrame:
    """One row per (budget, seed) with both models' accuracy and macro-F1 on `scored_split` (benchmarks choose
    hyperparameters on "val", so the test split is never looked at while choosing)."""
    cfg = params.data_efficiency
    train, test = splits[splits["split"] == "train"], splits[splits["split"] == scored_split]
    unlabeled = splits.loc[in_domain_unlabeled(splits), "text"].tolist()  # self-training pools these too
    sizes = train["label"].value_counts()
    largest = int(sizes.max())
    warn_capped_budgets(cfg.labels_per_class, sizes)
    budgets = sorted({largest if b is None else min(b, largest) for b in cfg.labels_per_class})
    points = []
    for budget in budgets:
        for seed, rows in draws(train, budget, cfg.seeds):
            pool = train.drop(rows.index)["text"].tolist() + unlabeled
            scores = point(params, cfg.strategy, rows, test, features, seed, pool)
            # `labels_per_class` is the budget: at most that many rows of each class (a smaller class gives all).
            points.append({"labels_per_class": budget, "every_row": budget >= largest, "seed": seed,
                           "train_rows": len(rows), **scores})
            log.info("data_efficiency: %s", points[-1])
    return pd.DataFrame(points)


def summarize(points: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std over draws) per budget; `gain` = transfer minus baseline accuracy."""
    grouped = points.groupby("labels_per_class", sort=True)
    curve = grouped[["transfer_accuracy", "baseline_accuracy", "transfer_macro_f1", "baseline_macro_f1"]].mean()
    curve["transfer_accuracy_std"] = grouped["transfer_accuracy"].std(ddof=0)
    curve["baseline_accuracy_std"] = grouped["baseline_accuracy"].std(ddof=0)
    curve["gain"] = curve["transfer_accuracy"] - curve["baseline_accuracy"]
    curve["draws"] = grouped.size()
    curve["every_row"] = grouped["every_row"].first()
    return curve.reset_index().round(4)


def curve_metrics(curve: pd.DataFrame, strategy: str) -> dict:
    """Per budget, keyed by labels per class, and "all" for every training row (so the key does not move with the
    data: `dvc metrics diff` lines up runs on other data)."""
    return {"strategy": strategy, "budgets": {
        "all" if row.every_row else str(int(row.labels_per_class)): {
            "labels_per_class": int(row.labels_per_class), "transfer_accuracy": row.transfer_accuracy,
            "baseline_accuracy": row.baseline_accuracy, "gain": row.gain, "draws": int(row.draws)}
        for row in curve.itertuples()}}


def plot_curve(curve: pd.DataFrame, strategy: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, style in zip(MODELS, ("o-", "s--")):
        ax.errorbar(curve["labels_per_class"], curve[f"{model}_accuracy"], yerr=curve[f"{model}_accuracy_std"],
                    fmt=style, capsize=3, label=f"{model} ({strategy})" if model == "transfer" else
                    "no-transfer baseline (TF-IDF + LR)")
    ax.set(xscale="log", xlabel="labelled training rows per class", ylabel="test accuracy",
           title="Data efficiency: transfer vs no transfer")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def log_curve(params: Params, curve: pd.DataFrame, folder: Path) -> str:
    """One MLflow run: params, per-budget metrics (step = labels per class), the CSVs and the plot."""
    cfg = params.data_efficiency
    lineage = {"splits": params.paths.splits, "features": params.paths.features}
    with study_run(params.register.experiment, "data_efficiency", f"data-efficiency ({cfg.strategy})",
                   lineage) as run:
        features = read_json(params.paths.features / META_FILE)  # the probe's features: int8, bf16 or fp32
        mlflow.log_params({"strategy": cfg.strategy, "labels_per_class": str(cfg.labels_per_class),
                           "seeds": str(cfg.seeds), "backbone": params.backbone.name,
                           "data.source": str(params.data.source),
                           "preprocess.n_per_class": params.preprocess.n_per_class,
                           "features.runtime": features.get("runtime"), "features.precision": features.get("precision"),
                           "self_training_rounds": params.fine_tune.self_training.rounds,
                           "self_training_epochs": params.fine_tune.self_training.epochs,
                           "contrastive_pairs_per_row": params.fine_tune.contrastive.pairs_per_row})
        for row in curve.itertuples():
            mlflow.log_metrics({"transfer_accuracy": row.transfer_accuracy, "baseline_accuracy": row.baseline_accuracy,
                                "gain": row.gain}, step=int(row.labels_per_class))
        mlflow.log_artifacts(str(folder), artifact_path="data_efficiency")
        return run.info.run_id


def main() -> None:
    params = load_params()
    paths = params.paths
    params = pinned_to_features(params, read_json(paths.features / META_FILE))
    remove_outputs(paths.data_efficiency, paths.data_efficiency_metrics)
    splits = pd.read_parquet(paths.splits)
    features = load_features(paths.features)
    points = run_curve(params, splits, features)
    curve = summarize(points)
    with atomic_path(paths.data_efficiency) as folder:
        folder.mkdir()
        points.round(4).to_csv(folder / POINTS_CSV, index=False)
        curve.to_csv(folder / CURVE_CSV, index=False)
        plot_curve(curve, params.data_efficiency.strategy, folder / CURVE_PNG)
        run_id = log_curve(params, curve, folder)
    write_json(curve_metrics(curve, params.data_efficiency.strategy), paths.data_efficiency_metrics)
    log.info("data_efficiency (MLflow run %s):\n%s", run_id, curve.to_string(index=False))


if __name__ == "__main__":
    run_main(main)
