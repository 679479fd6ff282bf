import numpy as np
import pandas as pd
import pytest

from stages.backbone import embed, load_encoder, resolve_backbone, select_device
from stages.errors import PipelineError
from stages.extract_features import extract_features
from tests.conftest import repo_cfg


def test_shape_and_unit_norm(tiny_splits: tuple[pd.DataFrame, dict], tiny_features: np.ndarray) -> None:
    assert tiny_features.shape == (len(tiny_splits[0]), 384)
    assert np.allclose(np.linalg.norm(tiny_features, axis=1), 1.0, atol=1e-5)


def test_matches_sentence_transformers(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = tiny_splits[0]["text"].tolist()[:48]
    reference = sentence_transformers.SentenceTransformer(resolve_backbone("default"), device="cpu").encode(texts)
    ours, _ = extract_features(texts, repo_cfg("backbone", max_length=256), repo_cfg("extract_features", batch_size=16))
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999


def test_bucketing_keeps_input_order() -> None:
    tokenizer, model = load_encoder("default", select_device())
    texts = ["short", "a much longer sentence about a film that goes on and on", "mid length text"]
    together = embed(texts, tokenizer, model, max_length=64, batch_size=2)
    one_by_one = np.vstack([embed([t], tokenizer, model, max_length=64, batch_size=1) for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_bf16_is_close_to_fp32(tiny_splits: tuple[pd.DataFrame, dict], tiny_features: np.ndarray) -> None:
    texts = tiny_splits[0]["text"].tolist()[:32]
    bf16, meta = extract_features(texts, repo_cfg("backbone", max_length=64), repo_cfg("extract_features", precision="bf16"))
    assert meta["precision"] == "bf16"
    assert ((bf16 * tiny_features[:32]).sum(axis=1)).min() > 0.99


def test_unknown_backbone_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="backbone.name 'no/such-model'"):
        resolve_backbone("no/such-model")


def test_long_documents_are_truncated_not_rejected() -> None:
    tokenizer, model = load_encoder("default", select_device())
    long_text = "a remarkably long review that keeps going " * 2000
    vectors = embed([long_text, "short"], tokenizer, model, max_length=128, batch_size=2)
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()
