"""The arithmetic behind two benchmark figures: the fp32 ceiling of extraction and the adaptation ceiling's rows."""

import pandas as pd
import torch

from benchmarks.adaptation_ceiling import halves, many_labels
from benchmarks.run import linear_flop_per_token
from stages.adapt import TargetRows
from stages.backbone import load_encoder
from tests.conftest import REPO_PARAMS


def test_linear_flops_count_each_layer_of_the_real_backbone_once() -> None:
    _, model = load_encoder("default", torch.device("cpu"))
    hidden, inner, layers = model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers
    # per layer: query, key, value and attention output (hidden x hidden), then up and down (hidden x inner)
    assert linear_flop_per_token(model) == layers * 2 * (4 * hidden * hidden + 2 * hidden * inner)


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
    batch = REPO_PARAMS.fine_tune.finetune.batch_size
    assert params.adapt.steps == 3 * -(-65 // batch)
    assert params.adapt.self_training_steps == 0
    assert params.fine_tune == REPO_PARAMS.fine_tune
