"""What a CUDA machine adds to measure: per-process warm-up, and the served model on GPU against CPU.

1. Cold and warm throughput of the fine-tuning loop (LP-FT's second step, 4,096 movie rows, one epoch) and of
   extraction (every row of the splits, bf16 and fp32, batch 64 and 256), each in a fresh process, once with the
   attention kernels `stages.backbone.CUDA_ATTENTION` picks and once letting torch prefer cuDNN attention, which
   builds a graph per new padded length on first sight. "cold" is the first run in the process, "warm" the second.
2. If `models/candidate` exists (after `dvc repro` on this machine): `TextClassifier` scores the movie test split
   on CUDA (bf16 autocast) and on CPU (fp32); accuracy of each, argmax agreement and the largest probability gap.

Run from the project root on a CUDA machine, after `dvc repro` (or its stages up to fine_tune):
    python -m benchmarks.gpu [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


def _speed(variant: str, rows: int) -> dict[str, float]:
    """In this (fresh) process: the loop and extraction, cold then warm. `variant`: 'ours' or 'cudnn'."""
    from torch.nn.attention import SDPBackend

    from stages import backbone
    from stages.config import load_params
    from stages.finetune_loop import finetune
    from stages.model import head_from_sklearn

    if variant == "cudnn":
        backbone.CUDA_ATTENTION = [SDPBackend.CUDNN_ATTENTION, *backbone.CUDA_ATTENTION]  # torch 2.11 picks it first
    params = load_params()
    splits = pd.read_parquet(params.paths.splits)
    part = splits[splits["split"] == "train"]
    part = part.sample(n=min(rows, len(part)), random_state=params.fine_tune.seed)
    train = (part["text"].tolist(), part["label_id"].to_numpy())
    cfg = params.fine_tune.finetune.model_copy(update={"epochs": 1})
    classes = int(splits["label_id"].max()) + 1
    out: dict[str, float] = {}
    for run in ("cold", "warm"):
        tokenizer, encoder = backbone.load_encoder(params.backbone.name, backbone.select_device(),
                                                      params.backbone.revision)
        shape = (1 if classes == 2 else classes, encoder.config.hidden_size)
        head = head_from_sklearn(np.zeros(shape, dtype=np.float32), np.zeros(shape[0], dtype=np.float32))
        out[f"finetune samples/s {run}"] = finetune(encoder, tokenizer, head, cfg, train, None, 0).samples_per_second
    texts = splits["text"].tolist()
    for precision in ("bf16", "fp32"):
        for batch in (64, 256):
            for run in ("cold", "warm"):
                torch.cuda.synchronize()
                start = time.perf_counter()
                backbone.embed(texts, tokenizer, encoder, max_length=params.backbone.max_length, batch_size=batch,
                               precision=precision)
                torch.cuda.synchronize()
                out[f"extract {precision} batch {batch} texts/s {run}"] = len(texts) / (time.perf_counter() - start)
    return out


def served_agreement(folder: Path, splits_file: Path) -> dict[str, Any]:
    from stages.model import TextClassifier

    splits = pd.read_parquet(splits_file)
    test = splits[splits["split"] == "test"]
    texts, labels = test["text"].tolist(), test["label_id"].to_numpy()
    proba, out = {}, {"rows": len(texts)}
    for name in ("cuda", "cpu"):
        classifier = TextClassifier(folder, device=torch.device(name))
        classifier.predict_proba(texts[:64])
        start = time.perf_counter()
        proba[name] = classifier.predict_proba(texts)
        out[f"{name} texts/s"] = len(texts) / (time.perf_counter() - start)
        out[f"{name} accuracy"] = float((proba[name].argmax(axis=1) == labels).mean())
    out["argmax agreement"] = float((proba["cuda"].argmax(axis=1) == proba["cpu"].argmax(axis=1)).mean())
    out["max |p cuda - p cpu|"] = float(np.abs(proba["cuda"] - proba["cpu"]).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--rows", type=int, default=4096, help="fine-tuning rows (default 4096)")
    parser.add_argument("--speed-variant", choices=["ours", "cudnn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA device")
    if args.speed_variant:
        print(json.dumps(_speed(args.speed_variant, args.rows)))
        return
    from benchmarks import write_report
    from stages.config import load_params

    params = load_params()
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "speed": {}}
    for variant in ("cudnn", "ours"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--speed-variant", variant, "--rows",
                               str(args.rows)], check=True, stdout=subprocess.PIPE, text=True)
        result["speed"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'fresh process, ' + str(args.rows) + ' rows':<44}{'cuDNN attention':>16}{'ours':>10}")
    for key, value in result["speed"]["ours"].items():
        print(f"{key:<44}{result['speed']['cudnn'][key]:>16.0f}{value:>10.0f}")
    if Path(params.paths.model).is_dir():
        result["served"] = served_agreement(Path(params.paths.model), Path(params.paths.splits))
        print("served model, movie test split: " + ", ".join(f"{k} {v:.4g}" for k, v in result["served"].items()))
    if args.out:
        write_report(result, args.out)


if __name__ == "__main__":
    main()
