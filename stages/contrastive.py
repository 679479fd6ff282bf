"""Contrastive warm-up (SetFit's body phase) before LP-FT: the encoder learns from pairs of labelled rows that
their embeddings should agree (same class) or not (different classes), then the probe is refitted on its new
embeddings. Opt-in through fine_tune.contrastive.pairs_per_row; it pays with few labels (README: 64 per class)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from stages.backbone import autocast_dtype, compute_context, mean_pool, usable_length
from stages.config import ContrastiveConfig, FinetuneConfig
from stages.finetune_loop import Batcher, freeze_lowest, seed_everything


def training_pairs(labels: np.ndarray, pairs_per_row: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first rows, second rows, target cosine), shuffled: for every row, `pairs_per_row` times, a random other row of
    its class (target 1; none when the row is its class's only one) and a random row of another class (target 0)."""
    positions = np.arange(len(labels))
    first, second, target = [], [], []
    for _ in range(pairs_per_row):
        for i, label in enumerate(labels):
            same, other = positions[(labels == label) & (positions != i)], positions[labels != label]
            for partners, cosine in ((same, 1.0), (other, 0.0)):
                if len(partners):
                    first.append(i)
                    second.append(int(rng.choice(partners)))
                    target.append(cosine)
    order = rng.permutation(len(first))
    return (np.asarray(first, dtype=np.int64)[order], np.asarray(second, dtype=np.int64)[order],
            np.asarray(target, dtype=np.float32)[order])


def contrastive_warmup(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ContrastiveConfig,
                       loop: FinetuneConfig, train: tuple[list[str], np.ndarray], seed: int) -> list[float]:
    """One pass over the pairs of `train`, in place: the cosine of two rows' mean-pooled embeddings is pulled towards
    1 (same class) or 0 (SetFit's CosineSimilarityLoss), with AdamW and a linear schedule. LP-FT's own `loop` gives
    the truncation length, weight decay, warm-up share and frozen layers. Returns the step losses."""
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    device = next(encoder.parameters()).device
    freeze_lowest(encoder, loop.freeze_layers)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    batcher = Batcher(tokenizer, train[0], usable_length(loop.max_length, tokenizer, encoder), device)
    first, second, target = training_pairs(np.asarray(train[1]), cfg.pairs_per_row, rng)
    steps = -(-len(first) // cfg.batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=loop.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(loop.warmup_ratio * steps), steps)
    targets = torch.as_tensor(target, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, "auto") == torch.float16)
    losses = []
    encoder.train()
    for step in range(steps):
        part = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        inputs = batcher(np.concatenate([first[part], second[part]]))  # both sides in one forward pass
        with compute_context(device, "auto"):
            pooled = mean_pool(encoder(**inputs).last_hidden_state.float(), inputs["attention_mask"])
        n = len(first[part])
        cosine = torch.nn.functional.cosine_similarity(pooled[:n], pooled[n:])
        loss = torch.nn.functional.mse_loss(cosine, targets[part])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    encoder.eval()
    return losses

