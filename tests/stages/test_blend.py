"""fine_tune.blend: the n-gram baseline mixed into the candidate, its safe on-disk format, and the served blend."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.config import Params
from stages.fine_tune import choose_blend, fine_tune, fit_baseline
from stages.model import NGRAM_DIR, TextClassifier, read_info
from stages.ngram import NgramModel, save_ngram
from tests.conftest import SERVED_ATOL, repo_cfg, with_blend

LABELS = ["negative", "positive"]


@pytest.mark.parametrize("label_column", ["label", "domain"])  # two classes, then four
def test_saved_ngram_model_predicts_like_the_fitted_pipeline(tiny_splits: tuple, tmp_path: Path,
                                                             label_column: str) -> None:
    splits = tiny_splits[0]
    y = pd.factorize(splits[label_column])[0]
    pipeline = fit_baseline(splits["text"].tolist(), y, repo_cfg("fine_tune").baseline, seed=0)
    save_ngram(pipeline, tmp_path / "ngram")
    texts = [*splits["text"].head(40), "an unseen WORD, never in training!", ""]
    expected = pipeline.predict_proba(texts)
    assert np.allclose(NgramModel(tmp_path / "ngram").predict_proba(texts), expected, atol=1e-9)
    assert sorted(p.name for p in (tmp_path / "ngram").iterdir()) == ["ngram.json", "ngram.safetensors"]


def test_blend_weight_is_the_best_on_validation_and_ties_go_to_the_smaller() -> None:
    y = np.array([0, 1, 1])
    transfer = np.array([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])  # wrong on the last row
    ngram = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])       # wrong on the second
    cfg = repo_cfg("fine_tune").blend
    weight, scores = choose_blend(transfer, ngram, y, cfg.model_copy(update={"weights": [0.5, 0.0, 0.2]}))
    assert (weight, scores) == (0.2, {0.0: 2 / 3, 0.2: 1.0, 0.5: 2 / 3})  # 0.2 fixes the last row, 0.5 breaks the second
    assert choose_blend(transfer, ngram, y, cfg.model_copy(update={"weights": [0.5, 0.0]}))[0] == 0.0
    assert choose_blend(transfer[:0], ngram[:0], y[:0], cfg) == (0.0, {})


def test_blended_candidate_is_what_the_saved_model_serves(tiny_params: Params, tiny_splits: tuple,
                                                          tiny_features: np.ndarray, tmp_path: Path) -> None:
    predictions, record, _ = fine_tune(with_blend(tiny_params, [0.5]), tiny_splits[0], tiny_features, LABELS,
                                       tmp_path / "model")
    assert record["blend_weight"] == 0.5 and read_info(tmp_path / "model")["ngram_weight"] == 0.5
    columns = {m: predictions[[f"{m}_p0", f"{m}_p1"]].to_numpy() for m in ("candidate", "unblended", "baseline")}
    assert np.allclose(columns["candidate"], 0.5 * columns["unblended"] + 0.5 * columns["baseline"], atol=1e-6)
    assert not np.allclose(columns["candidate"], columns["unblended"])
    test = (tiny_splits[0]["split"] == "test").to_numpy()
    served = TextClassifier(tmp_path / "model").predict_proba(tiny_splits[0].loc[test, "text"].tolist())
    assert np.allclose(served, columns["candidate"][test], atol=SERVED_ATOL)


def test_no_blend_leaves_the_transferred_model_alone(tiny_params: Params, tiny_splits: tuple,
                                                     tiny_features: np.ndarray, tmp_path: Path) -> None:
    predictions, record, _ = fine_tune(with_blend(tiny_params, [0.0]), tiny_splits[0], tiny_features, LABELS,
                                       tmp_path / "model")
    assert record["blend_weight"] == 0.0 and "ngram_weight" not in read_info(tmp_path / "model")
    assert not (tmp_path / "model" / NGRAM_DIR).exists()
    assert np.array_equal(predictions[["candidate_p0", "candidate_p1"]].to_numpy(),
                          predictions[["unblended_p0", "unblended_p1"]].to_numpy())
