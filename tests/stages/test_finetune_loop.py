import pytest
import torch

from stages.backbone import load_encoder
from stages.errors import PipelineError
from stages.finetune_loop import encoder_param_groups, freeze_lowest


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
