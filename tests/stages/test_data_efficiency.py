from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import save_file

from stages.config import Params, load_params
from stages.data_efficiency import (
    CURVE_CSV,
    CURVE_PNG,
    POINTS_CSV,
    draws,
    main,
    run_curve,
    summarize,
    warn_capped_budgets,
)
from stages.errors import PipelineError
from stages.io import EMBEDDINGS_FILE, META_FILE, read_json, write_json
from stages.registry import tracking_uri
from tests.conftest import drop_labels, registry_client, self_training_on


def _train(splits: pd.DataFrame) -> pd.DataFrame:
    return splits[splits["split"] == "train"]


def test_draws_are_seeded_per_class_subsets(tiny_splits: tuple) -> None:
    train = _train(tiny_splits[0])
    first, again, other = draws(train, 3, [0, 0, 1])
    assert first[1]["label"].value_counts().to_dict() == {"negative": 3, "positive": 3}
    assert first[1].index.equals(again[1].index) and not first[1].index.equals(other[1].index)
    assert set(first[1].index) <= set(train.index)


def test_a_budget_that_takes_every_row_is_drawn_once(tiny_splits: tuple) -> None:
    train = _train(tiny_splits[0])
    for budget in (None, 10_000):
        (seed, rows), = draws(train, budget, [3, 4, 5])
        assert seed == 3 and rows.index.equals(train.index)


def test_curve_has_a_point_per_draw_and_transfer_beats_chance(tiny_params: Params, tiny_splits: tuple,
                                                             tiny_features: np.ndarray) -> None:
    points = run_curve(tiny_params, tiny_splits[0], tiny_features)
    largest = int(_train(tiny_splits[0])["label"].value_counts().max())
    assert points["labels_per_class"].tolist() == [4, 4, 8, 8, largest]  # [4, 8, null] x seeds [0, 1]; all rows once
    assert points.loc[points["labels_per_class"] == 4, "train_rows"].tolist() == [8, 8]
    curve = summarize(points)
    assert curve["draws"].tolist() == [2, 2, 1]
    assert curve["labels_per_class"].is_monotonic_increasing
    assert np.allclose(curve["gain"], curve["transfer_accuracy"] - curve["baseline_accuracy"], atol=1e-3)
    assert curve["transfer_accuracy"].iloc[-1] >= 0.6  # 42 training rows of real data, 18 test rows


def test_budgets_stay_apart_when_a_class_is_smaller_than_them(tiny_params: Params, tiny_splits: tuple,
                                                              tiny_features: np.ndarray) -> None:
    splits = tiny_splits[0]
    negatives = splits.index[(splits["split"] == "train") & (splits["label"] == "negative")]
    unbalanced = splits.drop(negatives[5:])  # 5 negative training rows left, the positives untouched
    params = tiny_params.model_copy(update={"data_efficiency": tiny_params.data_efficiency.model_copy(
        update={"labels_per_class": [8, 12, None], "seeds": [0]})})
    curve = summarize(run_curve(params, unbalanced, tiny_features))
    largest = int(_train(unbalanced)["label"].value_counts().max())
    assert curve["labels_per_class"].tolist() == [8, 12, largest] and (curve["draws"] == 1).all()
    assert curve["every_row"].tolist() == [False, False, True]


def test_budgets_that_do_not_draw_what_they_say_are_named(caplog: pytest.LogCaptureFixture) -> None:
    sizes = pd.Series({"positive": 30, "negative": 5})
    with caplog.at_level("WARNING"):
        warn_capped_budgets([4, 8, 40, None], sizes)
    assert "labels_per_class [40]: the largest class has 30 training rows" in caplog.text
    assert "labels_per_class [8]: fewer training rows than that in class(es) 'negative' (5)" in caplog.text


def test_finetune_strategy_trains_the_backbone_per_draw(tiny_params: Params, tiny_splits: tuple,
                                                        tiny_features: np.ndarray) -> None:
    params = tiny_params.model_copy(update={"data_efficiency": tiny_params.data_efficiency.model_copy(
        update={"labels_per_class": [4], "seeds": [0], "strategy": "finetune"})})
    probe = run_curve(tiny_params.model_copy(update={"data_efficiency": params.data_efficiency.model_copy(
        update={"strategy": "linear_probe"})}), tiny_splits[0], tiny_features)
    tuned = run_curve(params, tiny_splits[0], tiny_features)
    assert len(tuned) == 1 and 0.0 <= tuned["transfer_accuracy"].iloc[0] <= 1.0
    assert tuned["baseline_accuracy"].iloc[0] == probe["baseline_accuracy"].iloc[0]  # same draw, same baseline


def test_self_training_draws_its_pool_from_the_rows_a_draw_left_out(tiny_params: Params, tiny_splits: tuple,
                                                                   tiny_features: np.ndarray,
                                                                   trained_texts: list[str]) -> None:
    params = self_training_on(tiny_params)
    params = params.model_copy(update={"data_efficiency": params.data_efficiency.model_copy(
        update={"labels_per_class": [4], "seeds": [0], "strategy": "finetune"})})
    nyt = tiny_splits[0].index[tiny_splits[0]["domain"] == "nyt"][:6]  # a held-out domain's text: never pooled here
    splits = drop_labels(tiny_splits[0], nyt)
    points = run_curve(params, splits, tiny_features)
    drawn = set(draws(_train(splits), 4, [0])[0][1]["text"])
    training = set(_train(splits)["text"])
    assert len(points) == 1 and drawn <= set(trained_texts) <= training and set(trained_texts) - drawn


def _stage_inputs(params: Params, splits: pd.DataFrame, features: np.ndarray) -> None:
    params.paths.splits.parent.mkdir(parents=True)
    splits.to_parquet(params.paths.splits, index=False)
    params.paths.features.mkdir(parents=True)
    save_file({"embeddings": features}, str(params.paths.features / EMBEDDINGS_FILE))
    write_json({"backbone": "default", "backbone_revision": None, "precision": "fp32"}, params.paths.features / META_FILE)


def test_stage_writes_curve_plot_metrics_and_an_mlflow_run(tiny_params: Params, tiny_splits: tuple,
                                                           tiny_features: np.ndarray) -> None:
    _stage_inputs(tiny_params, tiny_splits[0], tiny_features)
    main()
    folder = tiny_params.paths.data_efficiency
    assert {p.name for p in folder.iterdir()} == {CURVE_CSV, POINTS_CSV, CURVE_PNG}
    curve = pd.read_csv(folder / CURVE_CSV)
    metrics = read_json(tiny_params.paths.data_efficiency_metrics)
    assert list(metrics["budgets"]) == [str(n) for n in curve["labels_per_class"][:-1]] + ["all"]
    assert metrics["budgets"]["all"]["labels_per_class"] == curve["labels_per_class"].iloc[-1]
    client = registry_client(tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(tiny_params.register.experiment).experiment_id])[0]
    assert run.data.tags["pipeline.stage"] == "data_efficiency"
    history = client.get_metric_history(run.info.run_id, "transfer_accuracy")
    assert sorted(m.step for m in history) == curve["labels_per_class"].tolist()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data_efficiency")} == {
        f"data_efficiency/{n}" for n in (CURVE_CSV, POINTS_CSV, CURVE_PNG)}


def test_a_zero_budget_is_rejected_by_name(tiny_params: Params) -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data_efficiency"]["labels_per_class"] = [0, 64]
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match="data_efficiency: .*labels_per_class must be positive"):
        load_params()
