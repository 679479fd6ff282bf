"""Which ONNX Runtime graph runs the backbone fastest: traced with SDPA or eager attention, with ORT's fused
SkipLayerNormalization or with the Add + LayerNormalization pairs it replaces, in int8 and fp32.

Each variant is exported from the same torch model with `stages.onnx_runtime.export` and run as the pipeline runs it
(one session, one intra-op thread) on the same 2,048 movie training texts as `benchmarks.run`, in length-sorted
batches of params.yaml's size; variants are interleaved, best of `--repeats`. Prints texts/s per thread, the lowest
and mean cosine of each variant's mean-pooled embeddings to torch's exact fp32 ones and, for int8, the kernel time
per op type from ORT's profiler (one extra pass each), so the time a fusion saves or costs is visible, and the
test accuracy of a linear probe on every training row's int8 features (`benchmarks.run`'s downstream check; torch
fp32 features beside them), since a fused int8 op may round differently.

Run from the project root:  python -m benchmarks.ort_fusions [--rows 2048] [--repeats 3] [--no-downstream]
                            [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import write_report
from benchmarks.run import load_splits, machine, mean_cosine, min_cosine, subset
from stages.backbone import embed, length_batches, load_encoder, mean_pool, pad_batch
from stages.config import Params, load_params
from stages.fine_tune import fit_probe
from stages.onnx_runtime import INPUTS, export, quantize, run_session, session

VARIANTS = {  # name: (attention traced, SkipLayerNormalization fused)
    "sdpa, SkipLayerNorm (the pipeline's until 2026-12-07)": ("sdpa", True),
    "sdpa, Add + LayerNorm (the pipeline's)": ("sdpa", False),
    "eager (fused Attention), SkipLayerNorm": ("eager", True),
    "eager (fused Attention), Add + LayerNorm": ("eager", False),
}
Batch = dict[str, np.ndarray]
Sessions = dict[tuple[str, str], tuple[Any, Path, bool]]  # (variant, precision): (session, graph, SkipLN fused)


def batches_of(texts: list[str], tokenizer: Any, max_length: int, size: int) -> list[Batch]:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    rows = length_batches([len(i) for i in ids], size)
    padded = [pad_batch(ids, batch, tokenizer, torch.device("cpu")) for batch in rows]
    return [{name: batch[name].numpy() for name in INPUTS} for batch in padded]


def pooled(hidden: list[np.ndarray], batches: list[Batch]) -> np.ndarray:
    vectors = torch.cat([mean_pool(torch.from_numpy(h), torch.from_numpy(b["attention_mask"]))
                         for h, b in zip(hidden, batches)])
    return torch.nn.functional.normalize(vectors, dim=1).numpy()


def kernel_seconds(profiled: Any) -> dict[str, float]:
    """Kernel seconds per op type that ran in a session opened with a `profile_prefix`, largest first; ends its
    profiling."""
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(Path(profiled.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
    return dict(sorted(((op, round(s, 3)) for op, s in totals.items()), key=lambda kv: -kv[1]))


def op_seconds(path: Path, skip_layer_norm: bool, batches: list[Batch], folder: Path) -> dict[str, float]:
    """Kernel seconds per op type over one profiled pass of the graph at `path`, in a session like the pipeline's
    (not interleaved with the timed passes: for the shares, not the speed)."""
    profiled = session(path, skip_layer_norm=skip_layer_norm, profile_prefix=folder / "profile")
    for batch in batches:
        profiled.run(None, batch)
    return kernel_seconds(profiled)


def build_sessions(model: Any, tokenizer: Any, folder: Path) -> Sessions:
    """Each variant's fp32 and int8 graph, opened as the pipeline opens them; the model keeps its own attention."""
    sessions = {}
    own = model.config._attn_implementation
    for i, (name, (attention, skip)) in enumerate(VARIANTS.items()):
        (folder / str(i)).mkdir()
        model.set_attn_implementation(attention)  # ORT fuses the eager graph's attention into one op, not SDPA's
        try:
            if model.config._attn_implementation != attention:  # transformers only warns when it cannot switch
                raise RuntimeError(f"the backbone cannot trace with {attention} attention")
            fp32 = export(model, tokenizer, folder / str(i), skip_layer_norm=skip)
        finally:
            model.set_attn_implementation(own)
        for precision, path in (("fp32", fp32), ("int8", quantize(fp32, folder / str(i) / "int8.onnx"))):
            sessions[(name, precision)] = (session(path, skip_layer_norm=skip), path, skip)
    return sessions


def run_interleaved(sessions: Sessions, batches: list[Batch], repeats: int
                    ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], list[np.ndarray]]]:
    """Best seconds of `repeats` passes per session, taken in turn, and each session's last output."""
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    outputs = {}
    for ort_session, _, _ in sessions.values():  # warm-up
        ort_session.run(None, batches[0])
    for _ in range(repeats):
        for key, (ort_session, _, _) in sessions.items():
            start = time.perf_counter()
            outputs[key] = [ort_session.run(None, batch)[0] for batch in batches]
            seconds[key].append(time.perf_counter() - start)
    return {key: min(s) for key, s in seconds.items()}, outputs


def probe_accuracy(params: Params, splits: Any, tokenizer: Any, model: Any, ort_session: Any | None) -> float:
    """Test accuracy of params.yaml's linear probe fit on every training row, on features from `ort_session`
    (torch exact fp32 when None), embedded as extract_features embeds them."""
    (train, y_train), (test, y_test) = (subset(splits, name, None, params.fine_tune.seed) for name in ("train", "test"))
    forward = None if ort_session is None else lambda batch: run_session(ort_session, batch)
    features = embed(train + test, tokenizer, model, max_length=params.backbone.max_length,
                     batch_size=params.extract_features.batch_size, precision="fp32", forward=forward)
    probe = fit_probe(features[:len(train)], y_train, params.fine_tune.linear_probe, params.fine_tune.seed)
    return round(float(probe.score(features[len(train):], y_test)), 4)


def print_results(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'ONNX Runtime graph (one thread)':<56}{'texts/s':>9}{'min cos':>9}{'mean cos':>10}")
    for label, row in results.items():
        if "texts_per_s_per_thread" in row:
            print(f"{label:<56}{row['texts_per_s_per_thread']:>9.0f}{row['min_cosine']:>9.4f}"
              f"{row['mean_cosine']:>10.5f}")
    for label, row in results.items():
        if "probe_accuracy" in row:
            print(f"{label}: linear probe test accuracy {row['probe_accuracy']:.4f}")
    for label, row in results.items():
        if "kernel_seconds" in row:
            top = ", ".join(f"{op} {s:.2f}" for op, s in list(row["kernel_seconds"].items())[:7])
            print(f"{label}: kernel seconds {sum(row['kernel_seconds'].values()):.2f}: {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="texts to embed")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed passes per variant")
    parser.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=True,
                        help="probe accuracy on every training row's int8 features per variant (default on)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report to write")
    args = parser.parse_args()
    params = load_params()
    splits = load_splits(params)[0]
    texts = subset(splits, "train", args.rows, params.fine_tune.seed)[0]
    tokenizer, model = load_encoder(params.backbone.name, torch.device("cpu"), params.backbone.revision)
    batches = batches_of(texts, tokenizer, params.backbone.max_length, params.extract_features.batch_size)
    with torch.inference_mode():
        reference = pooled([model(**{k: torch.from_numpy(v) for k, v in b.items()}).last_hidden_state.numpy()
                            for b in batches], batches)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ort-fusions-") as tmp:
        sessions = build_sessions(model, tokenizer, Path(tmp))
        best, outputs = run_interleaved(sessions, batches, args.repeats)
        for (name, precision), (ort_session, path, skip) in sessions.items():
            vectors = pooled(outputs[(name, precision)], batches)
            row = {"texts_per_s_per_thread": round(len(texts) / best[(name, precision)], 1),
                   "min_cosine": round(min_cosine(vectors, reference), 5),
                   "mean_cosine": round(mean_cosine(vectors, reference), 6)}
            if precision == "int8":
                row["kernel_seconds"] = op_seconds(path, skip, batches, path.parent)
                if args.downstream:
                    row["probe_accuracy"] = probe_accuracy(params, splits, tokenizer, model, ort_session)
            results[f"{precision}: {name}"] = row
        if args.downstream:
            results["torch exact fp32"] = {"probe_accuracy": probe_accuracy(params, splits, tokenizer, model, None)}
    print_results(results)
    if args.out:
        write_report({"command": "python -m benchmarks.ort_fusions", "rows": len(texts), "repeats": args.repeats,
                      "machine": machine(), "results": results}, args.out)


if __name__ == "__main__":
    main()
