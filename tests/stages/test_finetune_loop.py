import numpy as np
import pandas as pd
import pytest
import torch

from stages.backbone import load_encoder
from stages.errors import PipelineError
from stages.finetune_loop import encoder_param_groups, finetune, freeze_lowest
from stages.model import head_from_sklearn
from tests.conftest import repo_cfg


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_encoder("default", torch.device("cpu"))[1]


def _lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): group["lr"] for group in groups for p in group["params"]}


def test_layer_decay_gives_lower_layers_smaller_learning_rates(encoder: torch.nn.Module) -> None:
    groups = encoder_param_groups(encoder, 1e-4, 0.5)
    lr = _lr_of(groups)
    assert len(lr) == sum(len(g["params"]) for g in groups) == len(list(encoder.parameters()))  # each once
    named = dict(encoder.named_parameters())
    assert lr[id(named["encoder.layer.5.output.dense.weight"])] == pytest.approx(1e-4)
    assert lr[id(named["encoder.layer.4.output.dense.weight"])] == pytest.approx(5e-5)
    assert lr[id(named["encoder.layer.0.output.dense.weight"])] == pytest.approx(1e-4 * 0.5 ** 5)
    assert lr[id(named["embeddings.word_embeddings.weight"])] == pytest.approx(1e-4 * 0.5 ** 6)


def test_no_decay_is_one_group_and_frozen_parameters_are_left_out() -> None:
    encoder = load_encoder("default", torch.device("cpu"))[1]
    assert len(encoder_param_groups(encoder, 1e-4, 1.0)) == 1
    freeze_lowest(encoder, 2)
    lr = _lr_of(encoder_param_groups(encoder, 1e-4, 0.8))
    assert len(lr) == sum(p.requires_grad for p in encoder.parameters())
    assert min(lr.values()) == pytest.approx(1e-4 * 0.8 ** 3)  # layer 2, the lowest one still trained


def test_layer_decay_needs_a_bert_style_stack() -> None:
    with pytest.raises(PipelineError, match="fine_tune.finetune.layer_decay: backbone Linear"):
        encoder_param_groups(torch.nn.Linear(2, 2), 1e-4, 0.8)


def test_finetune_with_layer_decay_trains_every_layer(tiny_frame: pd.DataFrame) -> None:
    """Several optimizer groups through the fused AdamW step: the lowest group still moves, just less."""
    tokenizer, encoder = load_encoder("default", torch.device("cpu"))
    cfg = repo_cfg("fine_tune").finetune.model_copy(update={"epochs": 1, "min_steps": 0, "batch_size": 8,
                                                            "max_length": 32, "layer_decay": 0.5})
    rows = tiny_frame.head(32)
    labels = (rows["label"] == rows["label"].iloc[0]).to_numpy().astype(int)
    named = dict(encoder.named_parameters())
    watched = ["embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight",
               "encoder.layer.5.output.dense.weight"]
    before = {k: named[k].detach().clone() for k in watched}
    head = head_from_sklearn(np.zeros((1, encoder.config.hidden_size), dtype=np.float32), np.zeros(1, dtype=np.float32))
    log = finetune(encoder, tokenizer, head, cfg, (rows["text"].tolist(), labels), None, seed=0)
    assert log.best_epoch == 1 and np.isfinite(log.epochs[0]["train_loss"])
    moved = {k: float((named[k].detach() - before[k]).abs().max()) for k in watched}
    assert all(v > 0 for v in moved.values()), moved
    assert moved["embeddings.word_embeddings.weight"] < moved["encoder.layer.5.output.dense.weight"], moved
