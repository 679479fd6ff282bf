"""Self-training: a fine-tuned model pseudo-labels unlabelled text, keeps its confident rows and trains on them too.

Used in-domain by fine_tune (the training domains' rows preprocess kept as "unlabeled") and the data-efficiency study
(those, and the training rows a draw left out), and on a held-out domain's pool by adapt. Labels of the pool are
never read.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.config import FinetuneConfig
from stages.finetune_loop import TrainLog, train_at_least
from stages.io import log
from stages.model import Head, classify


def pseudo_label(proba: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(row positions, labels) of the confident predictions, the same number per class (the least-populated class's
    count, most confident first), so self-training does not drift towards the class the model already favours."""
    predicted, top = proba.argmax(axis=1), proba.max(axis=1)
    per_class = [np.flatnonzero((predicted == k) & (top >= confidence)) for k in range(proba.shape[1])]
    keep = min(len(rows) for rows in per_class)
    chosen = np.concatenate([rows[np.argsort(-top[rows], kind="stable")[:keep]] for rows in per_class])
    return chosen, predicted[chosen]


def self_train(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: Head, loop: FinetuneConfig,
               labelled: tuple[list[str], np.ndarray], pool: list[str], confidence: float,
               val: tuple[list[str], np.ndarray] | None, seed: int, *, pool_length: int, knobs: str, rounds: int = 1,
               ) -> tuple[TrainLog | None, int]:
    """`rounds` times: pseudo-label `pool` (truncated at `pool_length` tokens) with the model as it stands, then train
    it in place on `labelled` + the confident pool rows for `loop.epochs` (rounded up to `loop.min_steps`). Return the
    last round's training log (None when nothing was confident enough: the warning names `knobs`) and the number of
    pool rows it kept."""
    trained: tuple[TrainLog | None, int] = (None, 0)
    for round_ in range(rounds):
        proba = classify(encoder, tokenizer, head, pool, pool_length, 2 * loop.batch_size)
        rows, labels = pseudo_label(proba, confidence)
        if len(rows) == 0:
            log.warning("self-training: some class has no unlabelled row predicted with confidence >= %s; stopped "
                        "after %d of %d rounds (lower or enlarge: %s)", confidence, round_, rounds, knobs)
            break
        texts, y = labelled[0] + [pool[i] for i in rows], np.concatenate([labelled[1], labels])
        trained = train_at_least(encoder, tokenizer, head, loop, (texts, y), val, seed + round_), len(rows)
    return trained
