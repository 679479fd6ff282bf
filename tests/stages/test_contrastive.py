from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import fine_tune as fine_tune_module
from stages.backbone import embed, load_encoder, select_device
from stages.config import FinetuneConfig, Params, load_params
from stages.contrastive import contrastive_warmup, training_pairs
from stages.errors import PipelineError
from stages.finetune_loop import TrainLog
from stages.model import head_from_sklearn
from tests.conftest import ROOT, repo_cfg


def test_every_row_is_paired_within_its_class_and_across() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])  # class 2 has one row: no partner of its own class
    first, second, target = training_pairs(labels, 3, np.random.default_rng(0))
    assert len(first) == 5 * 3 + 6 * 3
    assert (first != second).all()
    assert np.array_equal(target == 1.0, labels[first] == labels[second])
    for row in range(len(labels)):
        mine = first == row
        assert (target[mine] == 0.0).sum() == 3
        assert (target[mine] == 1.0).sum() == (0 if row == 5 else 3)
    again = training_pairs(labels, 3, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip((first, second, target), again))  # seeded


def _class_gap(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine of same-class pairs minus that of different-class pairs (vectors are L2-normalised)."""
    cosine = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return float(cosine[same & off_diagonal].mean() - cosine[~same].mean())


def _train_rows(tiny_splits: tuple, n: int = 48) -> tuple[list[str], np.ndarray]:
    """The first `n` training rows of the tiny data (both classes)."""
    train = tiny_splits[0][tiny_splits[0]["split"] == "train"].head(n)
    return train["text"].tolist(), train["label_id"].to_numpy()


def _loop(**updates: object) -> FinetuneConfig:
    return repo_cfg("fine_tune").finetune.model_copy(update={"max_length": 48, **updates})


def test_warmup_pulls_a_class_together_and_the_classes_apart(tiny_splits: tuple) -> None:
    texts, labels = _train_rows(tiny_splits)
    tokenizer, encoder = load_encoder("default", select_device())
    before = embed(texts, tokenizer, encoder, max_length=48, batch_size=32, precision="fp32")
    cfg = repo_cfg("fine_tune").contrastive.model_copy(update={"pairs_per_row": 4, "learning_rate": 1e-4})
    losses = contrastive_warmup(encoder, tokenizer, cfg, _loop(), (texts, labels), seed=0)
    after = embed(texts, tokenizer, encoder, max_length=48, batch_size=32, precision="fp32")
    assert len(losses) == -(-len(texts) * 4 * 2 // cfg.batch_size)
    assert _class_gap(after, labels) > _class_gap(before, labels) + 0.02
    assert not encoder.training  # left ready to embed


def test_lpft_refits_its_head_on_the_warmed_encoder(tiny_params: Params, tiny_splits: tuple,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With fine_tune.contrastive on, LP-FT starts from a probe fitted on the warmed-up encoder's embeddings, not on
    the frozen features the probe was first fitted on."""
    texts, labels = _train_rows(tiny_splits)
    started: dict = {}

    def record_start(encoder, tokenizer, head, cfg, train, val, seed) -> TrainLog:
        started.update(encoder=encoder, tokenizer=tokenizer, head=head, weight=head.linear.weight.detach().clone())
        return TrainLog()

    monkeypatch.setattr(fine_tune_module, "train_at_least", record_start)
    ft = tiny_params.fine_tune
    params = tiny_params.model_copy(update={"fine_tune": ft.model_copy(update={
        "strategy": "finetune", "contrastive": ft.contrastive.model_copy(update={"pairs_per_row": 2})})})
    frozen = head_from_sklearn(np.ones((1, 384)), np.zeros(1))
    fine_tune_module.finetune_from_probe(params, frozen, (texts, labels), None, seed=0)

    _, pretrained = load_encoder("default", select_device())
    moved = [not torch.equal(a, b) for a, b in zip(started["encoder"].parameters(), pretrained.parameters())]
    assert any(moved)
    warmed = embed(texts, started["tokenizer"], started["encoder"], max_length=ft.finetune.max_length,
                   batch_size=32, precision="fp32")
    refit = fine_tune_module.fit_probe(warmed, labels, ft.linear_probe, 0)
    expected = head_from_sklearn(refit.coef_, refit.intercept_).linear.weight
    assert torch.allclose(started["weight"], expected, atol=1e-5)
    assert started["head"] is frozen  # refitted in place: callers classify and save the head they passed in


def _warmed(texts: list[str], labels: np.ndarray, loop: FinetuneConfig) -> tuple[list[float], dict]:
    tokenizer, encoder = load_encoder("default", select_device())
    cfg = repo_cfg("fine_tune").contrastive.model_copy(update={"pairs_per_row": 1})
    losses = contrastive_warmup(encoder, tokenizer, cfg, loop, (texts, labels), seed=3)
    return losses, {name: p.detach().clone() for name, p in encoder.named_parameters()}


def test_warmup_is_seeded_and_keeps_frozen_layers(tiny_splits: tuple) -> None:
    texts, labels = _train_rows(tiny_splits, n=16)
    losses, weights = _warmed(texts, labels, _loop())
    again, same = _warmed(texts, labels, _loop())
    assert losses == again and all(torch.equal(weights[k], same[k]) for k in weights)
    _, frozen = _warmed(texts, labels, _loop(freeze_layers=2))
    _, pretrained = load_encoder("default", select_device())
    for name, param in pretrained.named_parameters():
        if name.startswith("pooler."):  # BERT's pooler is outside mean pooling: no gradient either way
            continue
        kept = name.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1."))
        assert torch.equal(frozen[name], param.detach()) == kept, name


def test_contrastive_off_leaves_lpft_as_it_was(tiny_params: Params, tiny_splits: tuple,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    texts, labels = _train_rows(tiny_splits)
    calls: list[str] = []
    monkeypatch.setattr(fine_tune_module, "contrastive_warmup", lambda *a, **k: calls.append("warmup"))
    monkeypatch.setattr(fine_tune_module, "train_at_least", lambda *a, **k: TrainLog())
    params = tiny_params.model_copy(update={"fine_tune": tiny_params.fine_tune.model_copy(
        update={"strategy": "finetune"})})
    assert params.fine_tune.contrastive.pairs_per_row == 0  # params.yaml ships it off
    head = head_from_sklearn(np.ones((1, 384)), np.zeros(1))
    fine_tune_module.finetune_from_probe(params, head, (texts, labels), None, seed=0)
    assert calls == [] and torch.equal(head.linear.weight[1], torch.ones(384))


def test_pairs_need_lpft(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fine_tune"]["strategy"] = "linear_probe"
    params["fine_tune"]["contrastive"]["pairs_per_row"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=r"fine_tune\.contrastive\.pairs_per_row > 0 .* needs fine_tune\.strategy"):
        load_params(tmp_path / "params.yaml")
