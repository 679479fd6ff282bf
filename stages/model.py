"""The candidate model's on-disk format and the classifier that serves it: encoder -> mean pool -> linear head.

A model folder holds `model.json` (labels, strategy, resolved params), `head.safetensors` (weight [C, H],
bias [C]) and, when fine-tuning changed the encoder, `encoder/` (safetensors weights + tokenizer). A linear
probe keeps the frozen backbone, so its folder names the backbone instead of copying it. When fine_tune.blend gave
the n-gram model a weight, `ngram/` holds it and `model.json` its `ngram_weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stages.backbone import (
    compute_context,
    length_batches,
    load_encoder,
    mean_pool,
    pad_batch,
    select_device,
    tokenize,
    usable_length,
)
from stages.model_files import ENCODER_DIR, HEAD_FILE, NGRAM_DIR, encoder_path, read_info, write_info

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline



class Head(torch.nn.Module):
    """Linear classifier over L2-normalised mean-pooled embeddings."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.nn.functional.normalize(pooled, dim=-1))


def head_from_sklearn(coef: np.ndarray, intercept: np.ndarray) -> Head:
    """A softmax head equal to a fitted LogisticRegression (binary: logits [0, w.x + b])."""
    weight, bias = np.asarray(coef, dtype=np.float32), np.asarray(intercept, dtype=np.float32)
    if weight.shape[0] == 1:
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([np.zeros(1, dtype=np.float32), bias])
    return Head(torch.from_numpy(weight), torch.from_numpy(bias))


def save_model(folder: Path, head: Head, info: dict[str, Any], encoder: Any = None, tokenizer: Any = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.linear.weight.detach().cpu().contiguous(),
               "bias": head.linear.bias.detach().cpu().contiguous()}, str(folder / HEAD_FILE))
    if encoder is not None:
        encoder.save_pretrained(folder / ENCODER_DIR)
        tokenizer.save_pretrained(folder / ENCODER_DIR)
    write_info(folder, info)


def add_ngram(folder: Path, pipeline: Pipeline, weight: float) -> None:
    """Make the saved model in `folder` blend the fitted n-gram `pipeline` in with `weight`."""
    from stages.ngram import save_ngram  # scikit-learn: imported only where a blend is made or served

    save_ngram(pipeline, folder / NGRAM_DIR)
    write_info(folder, read_info(folder) | {"ngram_weight": weight})


def blend(transfer: np.ndarray, ngram: np.ndarray, weight: float) -> np.ndarray:
    """Class probabilities mixed linearly: (1 - weight) * transfer + weight * ngram; weight 0 leaves them as they are."""
    if weight == 0:
        return transfer
    return ((1.0 - weight) * transfer + weight * ngram).astype(np.float32)


def load_head(folder: Path) -> Head:
    tensors = load_file(str(folder / HEAD_FILE))
    return Head(tensors["weight"], tensors["bias"])


def classify(encoder: Any, tokenizer: Any, head: Head, texts: list[str], max_length: int,
             batch_size: int) -> np.ndarray:
    """Class probabilities [len(texts), C] of encoder -> mean pool -> head, batched by length."""
    device = next(encoder.parameters()).device
    encoder.eval()
    length = usable_length(max_length, tokenizer, encoder)
    encoded = tokenize(tokenizer, texts, length)
    out = np.zeros((len(texts), head.linear.out_features), dtype=np.float32)
    # one batch at a time, unlike `embed`: batch-parallel scoring held ~140 MiB more, against the 2 GiB peak target
    with torch.inference_mode(), compute_context(device, "auto"):
        for batch in length_batches([len(x) for x in encoded["input_ids"]], batch_size):
            padded = pad_batch(encoded["input_ids"], batch, tokenizer, device)
            hidden = encoder(**padded).last_hidden_state.float()
            logits = head(mean_pool(hidden, padded["attention_mask"]))
            out[batch] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return out


class TextClassifier:
    """Loads a model folder; `predict_proba(texts)` and `predict(texts)` in scikit-learn's terms."""

    def __init__(self, folder: Path, backbone: str | None = None, device: torch.device | None = None,
                 batch_size: int = 64) -> None:
        folder = Path(folder)
        self.info = read_info(folder)
        self.labels: list[str] = list(self.info["labels"])
        self.max_length: int = int(self.info["max_length"])
        self.batch_size = batch_size
        self.device = device or select_device()
        encoder = backbone if backbone and not (folder / ENCODER_DIR).is_dir() else encoder_path(folder)
        self.tokenizer, self.encoder = load_encoder(encoder, self.device)
        self.head = load_head(folder).to(self.device).eval()
        self.ngram_weight = float(self.info.get("ngram_weight", 0.0))
        self.ngram = None
        if self.ngram_weight:
            from stages.ngram import NgramModel

            self.ngram = NgramModel(folder / NGRAM_DIR)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:  # the tokenizer fails on an empty batch; an empty request gets an empty answer
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        proba = classify(self.encoder, self.tokenizer, self.head, texts, self.max_length, self.batch_size)
        return proba if self.ngram is None else blend(proba, self.ngram.predict_proba(texts), self.ngram_weight)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]
