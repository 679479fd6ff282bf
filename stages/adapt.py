"""adapt: few-shot domain adaptation of the candidate to each held-out domain, scored on rows never used for it.

Per held-out domain and seed, `adapt.labels_per_class` labelled rows per class are drawn from the domain and the
rest is split in two: an unlabelled pool (`adapt.unlabeled_fraction`: its text is used, its labels never) and the
rows every model is scored on. The domain's own unlabelled rows (data.empty_labels: unlabeled) join the pool. The
candidate's encoder and head (as fine_tune saved them; the n-gram blend is left out) are trained on the shots for
`adapt.steps` more steps ("shots only"), then, with `adapt.self_training_steps`, pseudo-labels the pool, keeps its
confident rows (class-balanced) and trains on shots + pseudo-labels ("adapted"). Both sit next to the unadapted
candidate and the no-transfer baseline on the same scored rows; a negative gain is reported, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.backbone import load_encoder, select_device
from stages.config import AdaptConfig, FinetuneConfig, Params, load_params
from stages.errors import PipelineError
from stages.evaluate import UNBLENDED, probabilities
from stages.finetune_loop import train_at_least
from stages.io import atomic_path, log, remove_outputs, run_main, write_json
from stages.model import Head, classify, encoder_path, load_head, read_info
from stages.plots import plt, save_figure
from stages.preprocess import HELDOUT, UNLABELED, take_per_class
from stages.registry import metric_key, study_run
from stages.self_training import self_train

POINTS_CSV, PER_DOMAIN_CSV, BARS_CSV, PLOT_PNG = "points.csv", "per_domain.csv", "bars.csv", "adaptation.png"
METRICS = ("unadapted_accuracy", "shots_only_accuracy", "adapted_accuracy", "gain", "self_training_gain",
           "baseline_accuracy", "negative_transfer", "self_training_negative")


@dataclass
class TargetRows:
    shots: pd.DataFrame     # labelled, trained on
    pool: pd.DataFrame      # unlabelled text for self-training (labels never read)
    scored: pd.DataFrame    # every model is scored here, nothing else touches them


def draw_target(domain: pd.DataFrame, cfg: AdaptConfig, seed: int, name: str,
                unlabeled: pd.DataFrame | None = None) -> TargetRows:
    """Split one held-out domain's labelled rows into shots, unlabelled pool and scored rows (disjoint, seeded); the
    domain's `unlabeled` rows join the pool."""
    counts = domain["label"].value_counts()
    if counts.min() <= cfg.labels_per_class:
        raise PipelineError(f"adapt: domain {name!r} has only {counts.to_dict()} rows per label, not more than "
                            f"adapt.labels_per_class={cfg.labels_per_class}; lower it so rows are left to score on")
    shots = take_per_class(domain, cfg.labels_per_class, seed)
    rest = domain.drop(shots.index)
    held_back = rest.sample(frac=cfg.unlabeled_fraction, random_state=seed)
    pool = pd.concat([held_back, unlabeled]) if unlabeled is not None else held_back
    return TargetRows(shots, pool.drop(columns=["label", "label_id"]), rest.drop(held_back.index))


def adapt_loop(ft: FinetuneConfig, cfg: AdaptConfig, steps: int) -> FinetuneConfig:
    """fine_tune's loop with adapt's learning rate for encoder and head alike, for at least `steps` steps."""
    return ft.model_copy(update={"epochs": 1, "min_steps": steps, "freeze_layers": 0, "layer_decay": 1.0,
                                 "learning_rate": cfg.learning_rate, "head_learning_rate_multiplier": 1.0})


@dataclass
class Candidate:
    tokenizer: PreTrainedTokenizerBase
    encoder: PreTrainedModel
    head: Head
    max_length: int


def load_candidate(model_dir: Path) -> Candidate:
    """The model fine_tune saved (its encoder, or the backbone a linear probe names) on the pipeline's device."""
    tokenizer, encoder = load_encoder(encoder_path(model_dir), select_device())
    return Candidate(tokenizer, encoder, load_head(model_dir), int(read_info(model_dir)["max_length"]))


def train_on_shots(params: Params, model: Candidate, shots: pd.DataFrame, seed: int) -> None:
    """Few-shot adaptation, in place: `adapt.steps` steps on the labelled target rows."""
    loop = adapt_loop(params.fine_tune.finetune, params.adapt, params.adapt.steps)
    train_at_least(model.encoder, model.tokenizer, model.head, loop,
                   (shots["text"].tolist(), shots["label_id"].to_numpy()), None, seed)


def adapted_proba(params: Params, model_dir: Path, target: TargetRows, seed: int) -> dict[str, np.ndarray | int]:
    """Continue training the saved candidate on the shots, then self-train on the pool; probabilities on the
    scored rows after each step, and how many pool rows were pseudo-labelled."""
    cfg, batch = params.adapt, 2 * params.fine_tune.finetune.batch_size
    model = load_candidate(model_dir)
    scored_texts = target.scored["text"].tolist()

    def scored_proba() -> np.ndarray:
        return classify(model.encoder, model.tokenizer, model.head, scored_texts, model.max_length, batch)

    train_on_shots(params, model, target.shots, seed)
    out: dict[str, np.ndarray | int] = {"shots_only": scored_proba(), "pseudo_labelled": 0}
    if cfg.self_training_steps == 0 or target.pool.empty:
        return out | {"adapted": out["shots_only"]}
    shots = target.shots["text"].tolist(), target.shots["label_id"].to_numpy()
    _, kept = self_train(model.encoder, model.tokenizer, model.head,
                         adapt_loop(params.fine_tune.finetune, cfg, cfg.self_training_steps), shots,
                         target.pool["text"].tolist(), cfg.self_training_confidence, None, seed,
                         pool_length=model.max_length,
                         knobs="adapt.self_training_confidence, adapt.unlabeled_fraction, the domain's unlabelled rows")
    if kept == 0:
        return out | {"adapted": out["shots_only"]}
    return out | {"adapted": scored_proba(), "pseudo_labelled": kept}


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(axis=1) == y).mean())


def check_domains(heldout: pd.DataFrame, labels_per_class: int, classes: dict[int, str]) -> None:
    """Before any training: every held-out domain needs more than `labels_per_class` rows of each label it has; a
    domain without some class is adapted and scored on the others, with a warning."""
    counts = heldout.groupby("domain")["label"].value_counts().unstack(fill_value=0)
    small = {str(name): {k: int(v) for k, v in row.items() if v} for name, row in counts.iterrows()
             if row[row > 0].min() <= labels_per_class}
    if small:
        raise PipelineError(f"adapt: held-out domain(s) {sorted(small)} have too few rows per label ({small}), "
                            f"not more than adapt.labels_per_class={labels_per_class}; lower it so rows are left to "
                            "score on, or keep such domains out of the data")
    for name, domain in heldout.groupby("domain"):
        missing = sorted(classes[i] for i in set(classes) - set(domain["label_id"]))
        if missing:
            log.warning("adapt: held-out domain %r has no row of class(es) %s: adapted and scored on the others",
                        name, missing)


def run_adaptation(params: Params, splits: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per (domain, seed): unadapted, shots-only, adapted and baseline accuracy on the same unseen rows."""
    cfg = params.adapt
    heldout = splits[splits["split"] == HELDOUT]
    if heldout.empty:
        raise PipelineError("adapt: no held-out domain to adapt to; set preprocess.train_domains so that some "
                            "domain is held out")
    # adapt trains the encoder and head: the n-gram blend (fine_tune.blend) stays out of every column it compares
    candidate, baseline = probabilities(predictions, UNBLENDED), probabilities(predictions, "baseline")
    train = splits[splits["split"] == "train"]
    check_domains(heldout, cfg.labels_per_class, dict(zip(train["label_id"], train["label"])))
    points = []
    for name, domain in heldout.groupby("domain", sort=True):
        own_text = splits[(splits["split"] == UNLABELED) & (splits["domain"] == name)]
        if cfg.self_training_steps and own_text.empty and cfg.unlabeled_fraction == 0:
            log.warning("adapt: adapt.self_training_steps is %d but domain %r has no unlabelled text: give the source "
                        "rows of it with empty labels (data.empty_labels: unlabeled) or set adapt.unlabeled_fraction",
                        cfg.self_training_steps, name)
        for seed in cfg.seeds:
            target = draw_target(domain, cfg, seed, str(name), own_text)
            y = target.scored["label_id"].to_numpy()
            result = adapted_proba(params, params.paths.model, target, seed)
            unadapted, shots_only, adapted = (accuracy(candidate[target.scored.index], y),
                                              accuracy(result["shots_only"], y), accuracy(result["adapted"], y))
            points.append({"domain": name, "seed": seed, "shots": len(target.shots),
                           "unlabeled_rows": len(target.pool), "pseudo_labelled": result["pseudo_labelled"],
                           "scored_rows": len(target.scored), "unadapted_accuracy": unadapted,
                           "shots_only_accuracy": shots_only, "adapted_accuracy": adapted,
                           "gain": adapted - unadapted, "self_training_gain": adapted - shots_only,
                           "baseline_accuracy": accuracy(baseline[target.scored.index], y),
                           "majority_accuracy": float(target.scored["label_id"].value_counts(normalize=True).max())})
            log.info("adapt: %s", points[-1])
    return pd.DataFrame(points)


def summarize(points: pd.DataFrame) -> pd.DataFrame:
    """Means per domain; negative transfer is flagged for the whole adaptation (vs unadapted) and, separately, for
    the self-training step (vs shots only)."""
    columns = ["unadapted_accuracy", "shots_only_accuracy", "adapted_accuracy", "gain", "self_training_gain",
               "baseline_accuracy", "majority_accuracy"]
    per_domain = points.groupby("domain", sort=True)[columns].mean()
    per_domain["gain_std"] = points.groupby("domain", sort=True)["gain"].std(ddof=0)
    per_domain["negative_transfer"] = per_domain["gain"] < 0
    per_domain["self_training_negative"] = per_domain["self_training_gain"] < 0
    return per_domain.reset_index().round(4)


def bar_columns(self_trained: bool) -> list[tuple[str, str]]:
    """The columns drawn as bars and their labels; the self-training bar only when some draw pseudo-labelled a row
    (else it repeats shots-only)."""
    bars = [("baseline_accuracy", "no-transfer baseline (source rows only)"),
            ("unadapted_accuracy", "transferred, unadapted"), ("shots_only_accuracy", "+ few-shot adaptation")]
    return bars + [("adapted_accuracy", "+ self-training on target text")] if self_trained else bars


def bars_table(per_domain: pd.DataFrame, self_trained: bool) -> pd.DataFrame:
    """The plot's bars, one row each, for `dvc plots` (which draws one value per category)."""
    rows = per_domain.to_dict(orient="records")
    return pd.DataFrame([{"bar": f"{row['domain']}: {label}", "accuracy": row[column]}
                         for row in rows for column, label in bar_columns(self_trained)])


def plot_adaptation(per_domain: pd.DataFrame, path: Path, self_trained: bool) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = np.arange(len(per_domain))
    bars = bar_columns(self_trained)
    width = 0.8 / len(bars)
    for i, (column, label) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, per_domain[column], width=width, label=label)
    ax.scatter(x, per_domain["majority_accuracy"], marker="_", s=900, color="black", zorder=3,
               label="majority class")
    ax.set(xticks=x, xticklabels=per_domain["domain"], ylim=(0.0, 1.0), ylabel="accuracy on unseen target rows",
           title="Few-shot domain adaptation")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    save_figure(fig, path)


def log_adaptation(params: Params, per_domain: pd.DataFrame, folder: Path) -> str:
    lineage = {"splits": params.paths.splits, "model": params.paths.model}
    with study_run(params.register.experiment, "adapt", "domain-adaptation", lineage) as run:
        mlflow.log_params(params.adapt.model_dump(mode="json") | {"data.source": str(params.data.source)})
        for row in per_domain.to_dict(orient="records"):
            mlflow.log_metrics({metric_key(f"{row['domain']}.{k}"): float(row[k]) for k in METRICS})
        mlflow.log_artifacts(str(folder), artifact_path="adaptation")
        return run.info.run_id


def adaptation_metrics(per_domain: pd.DataFrame) -> dict:
    return {row["domain"]: {k: row[k] for k in METRICS} for row in per_domain.to_dict(orient="records")}


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
        self_trained = bool(points["pseudo_labelled"].gt(0).any())
        bars_table(per_domain, self_trained).to_csv(folder / BARS_CSV, index=False)
        plot_adaptation(per_domain, folder / PLOT_PNG, self_trained)
        run_id = log_adaptation(params, per_domain, folder)
    write_json(adaptation_metrics(per_domain), paths.adaptation_metrics)
    log.info("adapt (MLflow run %s):\n%s", run_id, per_domain.to_string(index=False))
    for row in per_domain[per_domain["negative_transfer"]].itertuples():
        log.warning("adapt: negative transfer on %r: adapted %.4f against %.4f unadapted (mean over %s)",
                    row.domain, row.adapted_accuracy, row.unadapted_accuracy, "the seeds" if len(params.adapt.seeds) > 1
                    else "one seed")


if __name__ == "__main__":
    run_main(main)
