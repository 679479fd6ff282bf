"""extract_features: the frozen backbone embeds every row of every split once, cached to disk."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file

from stages.backbone import (
    amx_cpu,
    autocast_dtype,
    embed,
    load_encoder,
    select_device,
)
from stages.config import BackboneConfig, ExtractConfig, load_params
from stages.hub import folder_fingerprint, hub_commit
from stages.io import EMBEDDINGS_FILE, META_FILE, atomic_path, log, remove_outputs, run_main, write_json
from stages.onnx_runtime import onnx_forward

DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # what torch computes in


def resolve_runtime(cfg: ExtractConfig, device: torch.device, strategy: str) -> tuple[str, str]:
    """The (runtime, precision) to use. `auto` picks the fastest mode that passes the accuracy bound (README: speed
    against the peers) without opening a gap between the evaluated and the served model: on CUDA, torch autocast;
    on CPU, when the features only start fine-tuning (strategy finetune: the served model is the fine-tuned torch
    encoder), torch bf16 on a CPU with AMX, else int8 on ONNX Runtime; exact torch fp32 when the served
    linear probe reads them (strategy linear_probe)."""
    if (cfg.runtime, cfg.precision, device.type, strategy) == ("auto", "auto", "cpu", "finetune"):
        return ("torch", "bf16") if amx_cpu() else ("onnxruntime", "int8")
    if cfg.runtime == "torch" or (cfg.runtime == "auto" and cfg.precision != "int8"):
        return "torch", cfg.precision
    return "onnxruntime", "int8" if cfg.precision == "auto" else cfg.precision


def extract_features(texts: list[str], backbone: BackboneConfig, cfg: ExtractConfig,
                     strategy: str) -> tuple[np.ndarray, dict]:
    """Embeddings of `texts` (input order) and a record of how they were made (`strategy`: fine_tune.strategy)."""
    device = select_device()
    tokenizer, model = load_encoder(backbone.name, device, backbone.revision)
    runtime, precision = resolve_runtime(cfg, device, strategy)
    forward = None
    if runtime == "onnxruntime":
        try:
            forward = onnx_forward(model, tokenizer, precision)
        except Exception as error:  # export can fail in many ways for an architecture it does not cover
            if cfg.runtime != "auto" or isinstance(error, MemoryError):
                raise
            log.warning("extract_features: ONNX Runtime cannot run backbone %r (%s); runtime auto falls back to "
                        "torch, exact fp32", backbone.name, str(error)[:300])
            runtime, precision = "torch", "fp32"
    reduced = autocast_dtype(device, precision) if runtime == "torch" else None
    # Cast the weights once instead of in every autocast matmul (1.2x on an AMX CPU), except where the served
    # model must compute exactly these features: a linear probe on CUDA, served with autocast over fp32 weights.
    if reduced is not None and (device.type == "cpu" or strategy == "finetune"):
        model.to(reduced)
    start = time.perf_counter()
    vectors = embed(texts, tokenizer, model, max_length=backbone.max_length, batch_size=cfg.batch_size,
                    precision=precision if runtime == "torch" else "fp32", forward=forward)
    seconds = time.perf_counter() - start
    # Only what determines the vectors goes in `meta` (it is hashed with them); timings are logged, not saved.
    computed = DTYPE_NAMES[reduced] if runtime == "torch" else precision  # `auto` resolved: what the vectors are
    meta = {"backbone": backbone.name, "backbone_revision": hub_commit(backbone.name, model.name_or_path),
            "max_length": backbone.max_length, "runtime": runtime, "precision": computed, "rows": len(texts),
            "dim": int(vectors.shape[1])}
    fingerprint = folder_fingerprint(backbone.name)
    if fingerprint is not None:  # a local folder: fine_tune and the probe's model check it is still what it was
        meta["backbone_sha256"] = fingerprint
    log.info("extract_features: %d x %d in %.1fs (%.0f texts/s, %s %s on %s, %d threads; precision: %s)", len(texts),
             meta["dim"], seconds, len(texts) / max(seconds, 1e-9), runtime, computed, device,
             torch.get_num_threads(), cfg.precision)
    return vectors, meta | {"seconds": seconds}


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.features)
    splits = pd.read_parquet(params.paths.splits)
    vectors, meta = extract_features(splits["text"].tolist(), params.backbone, params.extract_features,
                                    params.fine_tune.strategy)
    with atomic_path(params.paths.features) as tmp:
        tmp.mkdir()
        save_file({"embeddings": vectors}, str(tmp / EMBEDDINGS_FILE))
        write_json({k: v for k, v in meta.items() if k != "seconds"}, tmp / META_FILE)


if __name__ == "__main__":
    run_main(main)
