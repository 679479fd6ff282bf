"""fine_tune: train the candidate (linear probe or full fine-tune) and, always, the no-transfer baseline.

With `fine_tune.blend`, the candidate then mixes in the baseline's probabilities with the weight that scores best on
the validation split; `predictions` keeps the transferred model alone as `unblended_p*`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.backbone import embed, load_encoder, select_device
from stages.config import BaselineConfig, BlendConfig, LinearProbeConfig, Params, load_params
from stages.contrastive import contrastive_warmup
from stages.errors import PipelineError
from stages.finetune_loop import TrainLog, seed_everything, train_at_least
from stages.hub import check_unchanged, folder_fingerprint
from stages.io import (
    META_FILE,
    atomic_path,
    load_features,
    log,
    read_json,
    remove_outputs,
    run_main,
    write_json,
    write_parquet,
)
from stages.model import Head, add_ngram, blend, classify, head_from_sklearn, save_model
from stages.ngram import UNBLENDED
from stages.preprocess import UNLABELED, in_domain_unlabeled
from stages.self_training import self_train


def fit_baseline(texts: list[str], labels: np.ndarray, cfg: BaselineConfig, seed: int) -> Pipeline:
    """The no-transfer baseline: TF-IDF n-grams + logistic regression, nothing pretrained."""
    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), max_features=cfg.max_features, sublinear_tf=True)
    classifier = LogisticRegression(C=cfg.C, max_iter=2000, random_state=seed)
    return make_pipeline(vectorizer, classifier).fit(texts, labels)


def fit_probe(features: np.ndarray, labels: np.ndarray, cfg: LinearProbeConfig, seed: int) -> LogisticRegression:
    """The linear probe: logistic regression on frozen, L2-normalised backbone features."""
    return LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=seed).fit(features, labels)


def _probabilities(prefix: str, proba: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}_p{k}": proba[:, k] for k in range(proba.shape[1])}


def _tenth(losses: list[float], *, first: bool) -> float:
    n = max(1, len(losses) // 10)
    return float(np.mean(losses[:n] if first else losses[-n:])) if losses else float("nan")


def finetune_from_probe(params: Params, head: Head, train: tuple[list[str], np.ndarray],
                        val: tuple[list[str], np.ndarray] | None, seed: int,
                        ) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, TrainLog]:
    """LP-FT: the pretrained backbone and the probe's `head` trained together, in place. With
    fine_tune.contrastive, the backbone first warms up on pairs of `train` rows and `head` is refitted on its new
    embeddings."""
    seed_everything(seed)
    cfg = params.fine_tune
    tokenizer, encoder = load_encoder(params.backbone.name, select_device(), params.backbone.revision)
    if cfg.contrastive.pairs_per_row:
        start = time.perf_counter()
        losses = contrastive_warmup(encoder, tokenizer, cfg.contrastive, cfg.finetune, train, seed)
        log.info("fine_tune: contrastive warm-up, %d steps in %.1fs, loss %.4f over its first tenth, %.4f over its "
                 "last", len(losses), time.perf_counter() - start, _tenth(losses, first=True),
                 _tenth(losses, first=False))
        warmed = embed(train[0], tokenizer, encoder, max_length=cfg.finetune.max_length,
                       batch_size=2 * cfg.finetune.batch_size, precision="fp32")
        probe = fit_probe(warmed, train[1], cfg.linear_probe, seed)
        head.load_state_dict(head_from_sklearn(probe.coef_, probe.intercept_).state_dict())
    return tokenizer, encoder, train_at_least(encoder, tokenizer, head, cfg.finetune, train, val, seed)


def self_train_candidate(params: Params, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: Head,
                         train: tuple[list[str], np.ndarray], pool: list[str],
                         val: tuple[list[str], np.ndarray] | None, seed: int) -> tuple[TrainLog | None, int]:
    """fine_tune.self_training after LP-FT: train on labels + confident pseudo-labels of `pool`, in place."""
    cfg = params.fine_tune
    loop = cfg.finetune.model_copy(update={"epochs": cfg.self_training.epochs})
    return self_train(encoder, tokenizer, head, loop, train, pool, cfg.self_training.confidence, val, seed,
                      pool_length=loop.max_length, knobs="fine_tune.self_training.confidence, the unlabelled rows",
                      rounds=cfg.self_training.rounds)


def rows(texts: list[str], y: np.ndarray, mask: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [t for t, m in zip(texts, mask) if m], y[mask]


def train_candidate(params: Params, splits: pd.DataFrame, features: np.ndarray, labels: list[str],
                    folder: Path) -> tuple[np.ndarray, dict, dict]:
    """Fit and save the candidate into `folder`; return its probabilities for every row, a training record and
    its timings. The timings stay out of the model folder, so the same weights always hash the same for DVC."""
    cfg = params.fine_tune
    train, val = (splits["split"] == "train").to_numpy(), (splits["split"] == "val").to_numpy()
    unlabeled = (splits["split"] == UNLABELED).to_numpy()
    pool = in_domain_unlabeled(splits).to_numpy()
    y, texts = splits["label_id"].to_numpy(), splits["text"].tolist()
    start = time.perf_counter()
    probe = fit_probe(features[train], y[train], cfg.linear_probe, cfg.seed)
    head = head_from_sklearn(probe.coef_, probe.intercept_)
    record: dict = {"probe_val_accuracy": float(probe.score(features[val], y[val]))}
    timing: dict = {}
    info = {"strategy": cfg.strategy, "labels": labels, "backbone": params.backbone.name,
            "backbone_revision": params.backbone.revision,
            "params": params.model_dump(mode="json")}
    if cfg.strategy == "linear_probe":
        info["max_length"] = params.backbone.max_length
        fingerprint = folder_fingerprint(params.backbone.name)
        if fingerprint is not None:  # a local folder's files: the probe is only right on these
            info["backbone_sha256"] = fingerprint
        save_model(folder, head, info)
        proba = probe.predict_proba(features)
    else:
        tokenizer, encoder, train_log = finetune_from_probe(params, head, rows(texts, y, train),
                                                            rows(texts, y, val), cfg.seed)
        if cfg.self_training.epochs and not pool.any():
            log.warning("fine_tune: fine_tune.self_training.epochs is %d but no row of a training domain is "
                        "unlabeled: give the source rows with empty labels and set data.empty_labels: unlabeled, or set "
                        "preprocess.n_per_class and preprocess.keep_unlabeled: true", cfg.self_training.epochs)
        elif cfg.self_training.epochs:
            record["lpft_val_accuracy"] = train_log.epochs[train_log.best_epoch - 1]["val_accuracy"]
            self_log, record["pseudo_labelled"] = self_train_candidate(
                params, encoder, tokenizer, head, rows(texts, y, train), rows(texts, y, pool)[0], rows(texts, y, val),
                cfg.seed)
            train_log = self_log or train_log
        record.update(epochs=train_log.epochs, best_epoch=train_log.best_epoch)
        timing["train_samples_per_second"] = round(train_log.samples_per_second, 1)
        info["max_length"] = cfg.finetune.max_length
        proba = np.zeros((len(splits), len(labels)), dtype=np.float32)
        if train_log.val_proba is not None:
            proba[val] = train_log.val_proba
        rest = ~train & ~val & ~unlabeled
        proba[rest] = classify(encoder, tokenizer, head, rows(texts, y, rest)[0], cfg.finetune.max_length,
                               2 * cfg.finetune.batch_size)
        save_model(folder, head.cpu(), info | {"train": record}, encoder=encoder.cpu(), tokenizer=tokenizer)
    timing["seconds"] = round(time.perf_counter() - start, 1)
    return proba, record, timing


def training_metrics(record: dict) -> dict[str, float]:
    """The training record as flat numbers for `dvc metrics show` and MLflow: the kept epoch's figures."""
    flat = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if record.get("epochs"):
        kept = record["epochs"][record["best_epoch"] - 1]
        flat |= {"epochs_run": len(record["epochs"]), **{k: v for k, v in kept.items() if k != "epoch"}}
    return flat


def choose_blend(transfer: np.ndarray, ngram: np.ndarray, y: np.ndarray,
                 cfg: BlendConfig) -> tuple[float, dict[float, float]]:
    """The weight in `cfg.weights` whose blend is most accurate on the validation rows given (ties: the smaller;
    none given: 0), and the accuracy at each weight."""
    if len(y) == 0:
        return 0.0, {}
    scores = {w: float(np.mean(blend(transfer, ngram, w).argmax(axis=1) == y)) for w in sorted(set(cfg.weights))}
    return max(scores, key=scores.__getitem__), scores  # max keeps the first best: the smallest weight


def fine_tune(params: Params, splits: pd.DataFrame, features: np.ndarray, labels: list[str],
              folder: Path) -> tuple[pd.DataFrame, dict, dict]:
    """Train candidate and baseline on the same split; blend them if validation says so; return per-row
    probabilities of both (and of the transferred model alone), and the candidate's training record and timings."""
    train, val = (splits["split"] == "train").to_numpy(), (splits["split"] == "val").to_numpy()
    y = splits["label_id"].to_numpy()
    baseline = fit_baseline(splits.loc[train, "text"].tolist(), y[train], params.fine_tune.baseline,
                            params.fine_tune.seed)
    baseline_proba = baseline.predict_proba(splits["text"].tolist())
    transfer_proba, record, timing = train_candidate(params, splits, features, labels, folder)
    weight, scores = choose_blend(transfer_proba[val], baseline_proba[val], y[val], params.fine_tune.blend)
    record |= {"blend_weight": weight} | ({"blend_val_accuracy": scores[weight]} if scores else {})
    if weight > 0:
        add_ngram(folder, baseline, weight)
    candidate_proba = blend(transfer_proba, baseline_proba, weight)
    candidate_proba[~transfer_proba.any(axis=1)] = 0.0  # rows LP-FT trained on (or never scored) stay unscored
    log.info("fine_tune: %s %s %s", params.fine_tune.strategy, record, timing)
    return pd.DataFrame({
        "split": splits["split"], "domain": splits["domain"], "label_id": y,
        **_probabilities("candidate", candidate_proba),
        **_probabilities(UNBLENDED, transfer_proba),
        **_probabilities("baseline", baseline_proba),
    }), record, timing


def pinned_to_features(params: Params, meta: dict) -> Params:
    """`params` with backbone.revision set to the commit the features came from: LP-FT's encoder, and the backbone a
    linear probe names, must be the one its head was fit on, even if the branch the params name moved since."""
    if meta.get("backbone", params.backbone.name) != params.backbone.name:
        raise PipelineError(f"the features were extracted with backbone {meta['backbone']!r} but backbone.name is "
                            f"{params.backbone.name!r}; run `dvc repro extract_features` to rebuild them")
    check_unchanged(params.backbone.name, meta.get("backbone_sha256"), f"the features in {params.paths.features}")
    commit = meta.get("backbone_revision")
    return params if commit is None else params.model_copy(
        update={"backbone": params.backbone.model_copy(update={"revision": commit})})


def main() -> None:
    params = load_params()
    paths = params.paths
    remove_outputs(paths.model, paths.predictions, paths.training_metrics, paths.training_speed)
    splits = pd.read_parquet(paths.splits)
    labels = read_json(paths.label_map)["labels"]
    features = load_features(paths.features)
    meta = read_json(paths.features / META_FILE)
    params = pinned_to_features(params, meta)
    if params.fine_tune.strategy == "linear_probe" and meta["precision"] == "int8":
        log.warning("fine_tune: the linear probe is fit and scored on int8 features, but the served model embeds in "
                    "torch fp32: expect small differences (about 0.1 point of accuracy on the default data)")
    if len(features) != len(splits):
        raise PipelineError(f"{paths.features} holds {len(features)} rows but {paths.splits} has "
                            f"{len(splits)}; run `dvc repro extract_features` to rebuild the features")
    with atomic_path(paths.model) as folder:
        predictions, record, timing = fine_tune(params, splits, features, labels, folder)
    write_parquet(predictions, paths.predictions)
    write_json(training_metrics(record), paths.training_metrics)
    write_json(timing, paths.training_speed)


if __name__ == "__main__":
    run_main(main)
