"""The helpers behind benchmark figures: the fp32 ceiling, the adaptation ceiling's rows, the seed spread's read-back,
the adaptation variants' weight mixing, the SetFit peer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.adaptation_ceiling import ceiling_rows, halves, many_labels
from benchmarks.adaptation_variants import domain_points, interpolate, soup, variant_proba
from benchmarks.run import linear_flop_per_token, table_rows, texts_per_s
from benchmarks.seeds import experiments_by_name, figures, summary
from benchmarks.setfit_peer import train_setfit
from stages.adapt import TargetRows, adapt_loop, draw_target
from stages.backbone import load_encoder
from stages.config import Params
from stages.evaluate import UNBLENDED, probabilities
from stages.finetune_loop import training_epochs
from tests.conftest import REPO_PARAMS, ROOT, SERVED_ATOL


def test_linear_flops_count_each_layer_of_the_real_backbone_once() -> None:
    _, model = load_encoder("default", torch.device("cpu"))
    hidden, inner, layers = model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers
    # per layer: query, key, value and attention output (hidden x hidden), then up and down (hidden x inner)
    assert linear_flop_per_token(model) == layers * 2 * (4 * hidden * hidden + 2 * hidden * inner)


def test_median_rows_join_the_table_and_older_reports_still_render() -> None:
    report = json.loads((ROOT / "reports" / "benchmarks_xeon_bf16_noamx.json").read_text())
    extract = report["extract"]
    old_names = [row[0] for row in table_rows(report)]
    assert "extract torch_fp32 texts/s" in old_names and not any(n.endswith(", median") for n in old_names)
    best, median = texts_per_s(extract["rows"], extract["seconds"]["peer"])
    assert best == pytest.approx(extract["peer_texts_per_s"]) and median < best
    extract["peer_texts_per_s_median"] = median
    for mode in extract["modes"]:
        extract[mode]["texts_per_s_median"] = texts_per_s(extract["rows"], extract["seconds"][mode])[1]
    rows = {row[0]: row for row in table_rows(report)}
    _, ours, peer, _ = rows["extract torch_fp32 texts/s, median"]
    assert ours / peer == pytest.approx(1.50, abs=0.005)  # docs/results.md: the ratio of medians in that run


def test_halves_are_disjoint_stratified_and_cover_the_scored_rows(tiny_splits) -> None:
    scored = tiny_splits[0]
    extra, rest = halves(scored, seed=3)
    assert extra.index.intersection(rest.index).empty
    assert len(extra) + len(rest) == len(scored)
    for label, count in scored["label"].value_counts().items():
        assert abs((extra["label"] == label).sum() - count / 2) <= 1


def test_many_labels_runs_whole_passes_without_self_training(tiny_splits) -> None:
    rows = tiny_splits[0].iloc[:65]
    target = TargetRows(rows, rows.iloc[:0], rows.iloc[:0])
    params = many_labels(REPO_PARAMS, target, epochs=3)
    loop = adapt_loop(params.fine_tune.finetune, params.adapt, params.adapt.steps)
    assert training_epochs(loop, len(rows)) == 3  # what train_at_least runs, inside adapted_proba
    assert params.adapt.self_training_steps == 0


def test_ceiling_rows_keep_shots_extra_and_scored_rows_apart(tiny_splits) -> None:
    domain = tiny_splits[0]
    cfg = REPO_PARAMS.adapt.model_copy(update={"labels_per_class": 8, "unlabeled_fraction": 0.0})
    few, many = ceiling_rows(domain, cfg, seed=1, name="tiny")
    assert few.scored.index.equals(many.scored.index)
    assert few.shots.index.isin(many.shots.index).all()
    assert many.shots.index.intersection(few.scored.index).empty
    assert len(many.shots) + len(few.scored) == len(domain)
    assert abs(len(many.shots) - len(few.shots) - len(few.scored)) <= domain["label"].nunique()
    assert few.shots["label"].value_counts().eq(8).all()


def _experiment(name: str | None, rev: str, accuracy: float | None) -> dict:
    metrics = {} if accuracy is None else {"metrics/metrics.json": {"data": {"test": {
        "candidate_accuracy": accuracy, "unblended_accuracy": accuracy - 0.01}}}}
    return {"rev": rev, "name": name, "data": {"rev": rev, "metrics": metrics}}


def test_seed_runs_are_read_back_by_name_from_dvc_exp_show() -> None:
    # the shape `dvc exp show --json` prints: the baseline, then its experiments nested under "experiments"
    show = [{**_experiment(None, "base", 0.5), "experiments": [
        {"revs": [_experiment("epochs3-seed0", "a1", 0.86)]},
        {"revs": [_experiment("epochs3-seed1", "b2", 0.87)]},
        {"revs": [_experiment("queued", "c3", None)]},
    ]}]
    found = experiments_by_name(show)
    assert sorted(found) == ["epochs3-seed0", "epochs3-seed1"]
    runs = [figures(found[f"epochs3-seed{seed}"]) for seed in (0, 1)]
    assert [run["experiment"] for run in runs] == ["a1", "b2"]
    assert runs[1]["blend_weight"] is None  # a metrics file the run did not write reads as missing, not as an error
    assert summary(runs) == {"mean_test_accuracy": 0.865, "std_test_accuracy": 0.005,
                             "mean_unblended_test_accuracy": 0.855, "std_unblended_test_accuracy": 0.005}


def test_weight_interpolation_and_soup_average_floats_and_keep_integer_buffers() -> None:
    start = ({"w": torch.zeros(2), "ids": torch.tensor([0, 1])}, {"b": torch.tensor([1.0])})
    end = ({"w": torch.ones(2) * 4, "ids": torch.tensor([2, 3])}, {"b": torch.tensor([3.0])})
    quarter = interpolate(start, end, 0.25)
    assert torch.equal(quarter[0]["w"], torch.ones(2)) and torch.equal(quarter[1]["b"], torch.tensor([1.5]))
    assert quarter[0]["ids"].dtype == torch.int64 and torch.equal(quarter[0]["ids"], end[0]["ids"])
    assert torch.equal(interpolate(start, end, 1.0)[0]["w"], end[0]["w"])
    mean = soup([start, end])
    assert torch.equal(mean[0]["w"], torch.full((2,), 2.0)) and torch.equal(mean[1]["b"], torch.tensor([2.0]))
    assert torch.equal(mean[0]["ids"], end[0]["ids"])


def test_adaptation_variants_at_their_end_points_are_the_models_they_mix(tiny_params: Params, trained: tuple) -> None:
    splits, predictions = trained  # a linear-probe candidate saved by fine_tune, and its probabilities
    domain = splits[(splits["split"] == "heldout") & (splits["domain"] == "amazon")]
    target = draw_target(domain, tiny_params.adapt, 0, "amazon")
    candidate = probabilities(predictions, UNBLENDED)[target.scored.index]
    proba = variant_proba(tiny_params, target.scored["text"].tolist(), candidate, target.shots, seed=0, runs=2,
                          alphas=[0.0, 1.0])
    assert set(proba) == {"shots only", "+ unadapted", "WiSE-FT 0.0", "WiSE-FT 1.0", "soup of 2", "ensemble of 2"}
    assert np.allclose(proba["WiSE-FT 0.0"], candidate, atol=SERVED_ATOL)  # the candidate's own weights
    assert np.allclose(proba["WiSE-FT 1.0"], proba["shots only"], atol=1e-5)  # run 0's weights
    assert not np.allclose(proba["shots only"], candidate, atol=1e-3)  # adaptation moved the model
    assert np.allclose(proba["+ unadapted"], (proba["shots only"] + candidate) / 2)
    points = domain_points(tiny_params, "amazon", domain, probabilities(predictions, UNBLENDED), 0, 1, [0.5])
    assert [p["variant"] for p in points] == ["unadapted", "shots only", "+ unadapted", "WiSE-FT 0.5"]
    half_a = halves(target.scored, 0)[1]  # the scored half of adaptation_ceiling's split
    unadapted = probabilities(predictions, UNBLENDED)[half_a.index].argmax(axis=1)
    assert points[0]["half_a"] == float((unadapted == half_a["label_id"].to_numpy()).mean())


def test_the_setfit_peer_trains_its_body_seeded_and_leaves_no_files(tiny_splits, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from setfit import SetFitModel

    from stages.hub import resolve_backbone

    splits = tiny_splits[0]
    rows = splits[splits["split"] == "train"].groupby("label").head(4)
    texts = splits.loc[splits["split"] == "test", "text"].tolist()
    monkeypatch.chdir(tmp_path)
    first, second = (train_setfit(REPO_PARAMS, rows, iterations=4, seed=0) for _ in range(2))
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_allclose(first.predict_proba(texts), second.predict_proba(texts), atol=1e-6)
    pretrained = SetFitModel.from_pretrained(str(resolve_backbone("default"))).model_body.encode(texts)
    assert not np.allclose(first.model_body.encode(texts), pretrained, atol=1e-4)  # contrastive training moved it
