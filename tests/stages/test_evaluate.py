import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from stages.evaluate import calibration, evaluate, metrics_summary
from stages.plots import confusion_rows, write_plots

LABELS = ["negative", "positive"]


def _predictions(y: np.ndarray, candidate: np.ndarray, baseline: np.ndarray, split: list[str],
                 domain: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"split": split, "domain": domain, "label_id": y,
                         "candidate_p0": 1 - candidate, "candidate_p1": candidate,
                         "baseline_p0": 1 - baseline, "baseline_p1": baseline})


def _case() -> pd.DataFrame:
    """Five in-domain test rows (candidate right on all, baseline on 3) and three nyt rows (candidate 1, baseline 2)."""
    y = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    candidate = np.array([0.1, 0.9, 0.8, 0.3, 0.6, 0.2, 0.3, 0.6])
    baseline = np.array([0.6, 0.4, 0.7, 0.2, 0.6, 0.8, 0.9, 0.1])
    split = ["test"] * 5 + ["heldout"] * 3
    domain = ["movie"] * 5 + ["nyt"] * 3
    return _predictions(y, candidate, baseline, split, domain)


def test_metrics_match_sklearn_and_gain_is_candidate_minus_baseline() -> None:
    predictions = _case()
    splits = pd.DataFrame({"split": ["train"] * 2 + predictions["split"].tolist(),
                           "domain": ["movie"] * 2 + predictions["domain"].tolist()})
    features = np.vstack([np.tile([1.0, 0, 0, 0], (7, 1)), np.tile([0, 1.0, 0, 0], (3, 1))])
    report = evaluate(predictions, splits, features, LABELS, bins=5)
    test = predictions[predictions["split"] == "test"]
    y_hat = test["candidate_p1"].gt(0.5).astype(int)
    assert report["test"]["candidate"]["accuracy"] == accuracy_score(test["label_id"], y_hat)
    assert report["test"]["candidate"]["macro_f1"] == f1_score(test["label_id"], y_hat, average="macro")
    gain = report["test"]["transfer_gain"]["accuracy"]
    assert gain == report["test"]["candidate"]["accuracy"] - report["test"]["baseline"]["accuracy"] > 0
    nyt = report["domains"]["nyt"]
    assert nyt["negative_transfer"] is True and nyt["transfer_gain"]["accuracy"] < 0
    assert nyt["shift"]["embedding_distance"] > 0.9  # orthogonal centroids
    summary = metrics_summary(report)
    assert summary["domains"]["nyt"]["negative_transfer"] is True
    assert report["test"]["candidate"]["confusion_matrix"] == [[2, 0], [0, 3]]


def test_calibration_error_is_zero_when_confidence_matches_accuracy() -> None:
    y = np.array([1, 1, 1, 0] * 25)
    proba = np.tile([0.25, 0.75], (100, 1))
    ece, bins = calibration(y, proba, bins=10)
    assert abs(ece) < 1e-9 and bins[0]["count"] == 100


def test_plots_are_written_as_data_and_png(tmp_path) -> None:
    predictions = _case()
    splits = pd.DataFrame({"split": ["train"] * 2 + predictions["split"].tolist(),
                           "domain": ["movie"] * 2 + predictions["domain"].tolist()})
    report = evaluate(predictions, splits, np.ones((10, 4)), LABELS, bins=5)
    write_plots(report, LABELS, tmp_path)
    for name in ("confusion.csv", "per_domain.csv", "calibration.csv", "confusion.png", "per_domain.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(confusion_rows([[2, 1], [0, 3]], LABELS)) == 6


def test_the_unblended_transferred_model_is_reported_beside_the_blend() -> None:
    predictions = _case()
    unblended = np.array([0.6, 0.9, 0.8, 0.3, 0.6, 0.2, 0.3, 0.6])  # the first test row wrong before the blend
    predictions = predictions.assign(unblended_p0=1 - unblended, unblended_p1=unblended)
    splits = pd.DataFrame({"split": ["train"] * 2 + predictions["split"].tolist(),
                           "domain": ["movie"] * 2 + predictions["domain"].tolist()})
    summary = metrics_summary(evaluate(predictions, splits, np.ones((10, 4)), LABELS, bins=5))
    assert summary["test"]["unblended_accuracy"] == 0.8 and summary["test"]["candidate_accuracy"] == 1.0
    assert summary["test"]["transfer_gain"] == 0.2  # unblended 0.8 - baseline 0.6: the blend's share is not transfer
    assert "unblended_accuracy" not in metrics_summary(evaluate(_case(), splits, np.ones((10, 4)), LABELS, bins=5))["test"]
