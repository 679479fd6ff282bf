"""Benchmark the pipeline against peer libraries, measured in the same run, on the same data and model.

What it measures (the project's default data and backbone, from params.yaml in the current directory):
  1. feature extraction throughput (texts/s) of `stages.extract_features` in each runtime and precision (torch
     fp32, ONNX Runtime fp32, ONNX Runtime int8, torch bf16) against `sentence_transformers.SentenceTransformer
     .encode` with the same model, max length and batch size, plus the cosine between our embeddings and the peer's.
     On a CPU it also measures the ceiling of exact fp32 there: the encoder's linear layers over the texts' real
     tokens (no padding) at this machine's measured fp32 matrix-product rate, with everything else free;
  2. what each mode costs downstream: linear-probe test accuracy on features from each mode (all training rows);
  3. fine-tuning throughput (samples/s) and test accuracy of the project's torch loop (LP-FT: linear probe,
     then `stages.finetune_loop.finetune`) against `transformers.Trainer` with the same hyperparameters
     (1,024 rows, max length 64, batch 32, 3 epochs by default; neither loop validates).

On a CUDA machine everything runs on the GPU, as the pipeline does: the extraction modes are torch fp32 and torch
bf16 autocast (ONNX Runtime is a CPU backend here), the peer encodes in fp32 and in bf16 weights, and the `Trainer`
trains with `bf16=True`, the mixed precision our loop uses on CUDA.

Run from the project root:  python -m benchmarks.run [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers

from benchmarks import write_report
from stages.backbone import load_encoder, native_bf16_cpu, select_device
from stages.config import ExtractConfig, Params, load_params
from stages.extract_features import extract_features
from stages.fine_tune import fit_probe
from stages.finetune_loop import finetune, seed_everything
from stages.hub import resolve_backbone
from stages.ingest import ingest
from stages.model import TextClassifier, head_from_sklearn, save_model
from stages.preprocess import preprocess

Row = tuple[str, float, float, str]  # name, ours, peer, peer description


def load_splits(params: Params) -> tuple[pd.DataFrame, list[str]]:
    splits, label_map, _ = preprocess(ingest(params.data), params.preprocess)
    return splits, sorted(label_map, key=label_map.get)


def subset(splits: pd.DataFrame, name: str, n: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    part = splits[splits["split"] == name]
    if n is not None and n < len(part):
        part = part.sample(n=n, random_state=seed)
    return part["text"].tolist(), part["label_id"].to_numpy().copy()


def _cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True).clip(min=1e-12)
    return (ours * theirs).sum(axis=1)


def min_cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(_cosines(ours, theirs).min())


def mean_cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(_cosines(ours, theirs).mean())


MODES = {"torch_fp32": ("torch", "fp32"), "onnx_fp32": ("onnxruntime", "fp32"), "onnx_int8": ("onnxruntime", "int8"),
         "torch_bf16": ("torch", "bf16")}
CUDA_MODES = ["torch_fp32", "torch_bf16"]


def modes_for(device: torch.device) -> list[str]:
    return CUDA_MODES if device.type == "cuda" else list(MODES)


def bf16_training(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def bf16_emulated(device: torch.device) -> bool:
    """A CPU without bf16 hardware: bf16 runs ~10x slower than fp32 there, so it gets fewer rows."""
    return device.type == "cpu" and not native_bf16_cpu()


def texts_per_s(rows: int, seconds: list[float]) -> tuple[float, float]:
    """The best and the median throughput over interleaved repeats."""
    return rows / min(seconds), rows / float(np.median(seconds))


def bench_extract(params: Params, texts: list[str], repeats: int, bf16_rows: int,
                  device: torch.device) -> dict[str, Any]:
    """Our extract_features in each runtime/precision vs SentenceTransformer.encode, interleaved, best of `repeats`
    (and the median: on a shared VM the peer's best moves from run to run more than ours).

    Our texts/s is embedding time only (meta["seconds"]), like the peer's encode of an already loaded model;
    `texts_per_s_incl_load` adds the model load (and, for ONNX Runtime, the export) that every call does. bf16
    embeds only the first `bf16_rows` texts on a CPU without bf16 hardware (AVX512-BF16 or AMX), where it is slow.
    On CUDA a second peer, `peer_bf16`, encodes with its weights in bf16.
    """
    from sentence_transformers import SentenceTransformer

    batch = params.extract_features.batch_size
    path = resolve_backbone(params.backbone.name, params.backbone.revision)
    peers = {"peer": SentenceTransformer(path, device=device.type)}
    if device.type == "cuda":
        peers["peer_bf16"] = SentenceTransformer(path, device=device.type, model_kwargs={"dtype": torch.bfloat16})
    cfgs = {name: params.extract_features.model_copy(update={"runtime": MODES[name][0], "precision": MODES[name][1]})
            for name in modes_for(device)}
    for peer in peers.values():
        peer.max_seq_length = params.backbone.max_length
        peer.encode(texts[:8], batch_size=batch)  # untimed warm-ups
    for cfg in cfgs.values():
        extract_features(texts[:8], params.backbone, cfg, "linear_probe")
    runs: dict[str, list[tuple[float, float]]] = {**{name: [] for name in peers}, **{name: [] for name in cfgs}}
    vectors: dict[str, np.ndarray] = {}
    rows = {name: len(texts) for name in runs}
    ceiling = fp32_ceiling(params, texts) if device.type == "cpu" else None
    if bf16_emulated(device):
        rows["torch_bf16"] = min(bf16_rows, len(texts))
    for _ in range(repeats):
        for name, peer in peers.items():
            start = time.perf_counter()
            vectors[name] = peer.encode(texts, batch_size=batch, convert_to_numpy=True)
            runs[name].append((time.perf_counter() - start,) * 2)
        for name, cfg in cfgs.items():
            start = time.perf_counter()
            vectors[name], meta = extract_features(texts[:rows[name]], params.backbone, cfg, "linear_probe")
            runs[name].append((max(meta["seconds"], 1e-9), time.perf_counter() - start))
    speed = {k: texts_per_s(rows[k], [r[0] for r in v]) for k, v in runs.items()}  # (best, median)
    with_load = {k: rows[k] / min(r[1] for r in v) for k, v in runs.items()}
    out: dict[str, Any] = {"rows": len(texts), "repeats": repeats, "batch_size": batch,
                           "peer_texts_per_s": speed["peer"][0],
                           "peer_texts_per_s_median": speed["peer"][1],
                           "seconds": {k: [r[0] for r in v] for k, v in runs.items()}, "modes": list(cfgs)}
    if ceiling is not None:
        out["fp32_ceiling"] = ceiling
    if "peer_bf16" in peers:
        out["peer_bf16"] = {"texts_per_s": speed["peer_bf16"][0],
                            "min_cosine": min_cosine(vectors["peer_bf16"].astype(np.float32), vectors["peer"]),
                            "mean_cosine": mean_cosine(vectors["peer_bf16"].astype(np.float32), vectors["peer"])}
    for name in cfgs:
        out[name] = {"texts_per_s": speed[name][0], "texts_per_s_median": speed[name][1],
                     "texts_per_s_incl_load": with_load[name],
                     "min_cosine": min_cosine(vectors[name], vectors["peer"][:rows[name]]),
                     "mean_cosine": mean_cosine(vectors[name], vectors["peer"][:rows[name]]), "rows": rows[name]}
    return out


def linear_flop_per_token(model: torch.nn.Module) -> int:
    """FLOPs of every linear layer one token passes through (the pooler, once per text, is left out)."""
    return sum(2 * m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "pooler" not in name)


def matmul_gflops(rows: int, inner: int, outer: int, repeats: int = 20) -> float:
    """This machine's fp32 `linear` rate at one shape, best of five timings of `repeats` products."""
    x, weight = torch.randn(rows, inner), torch.randn(outer, inner)
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(x, weight)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, weight)
            best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * rows * inner * outer / best / 1e9


def fp32_ceiling(params: Params, texts: list[str]) -> dict[str, float]:
    """The most exact fp32 extraction can reach on this CPU: the linear layers' FLOPs over the real tokens at the
    fp32 rate measured at the shape of the feed-forward layer (a batch's tokens x hidden x intermediate)."""
    tokenizer, model = load_encoder(params.backbone.name, torch.device("cpu"), params.backbone.revision)
    ids = tokenizer(texts, truncation=True, max_length=params.backbone.max_length)["input_ids"]
    tokens = sum(len(x) for x in ids)
    rows = params.extract_features.batch_size * round(tokens / len(texts))
    gflops = matmul_gflops(rows, model.config.hidden_size, model.config.intermediate_size)
    gflop = tokens * linear_flop_per_token(model) / 1e9
    return {"tokens": tokens, "linear_gflop": gflop, "matmul_gflops": gflops,
            "texts_per_s": len(texts) * gflops / gflop}


def bench_downstream(params: Params, train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray],
                     modes: list[str]) -> dict[str, float]:
    """Linear-probe test accuracy on features from each mode: what reduced precision costs downstream."""
    accuracy = {}
    for name in modes:
        runtime, precision = MODES[name]
        cfg = params.extract_features.model_copy(update={"runtime": runtime, "precision": precision})
        features, _ = extract_features(train[0] + test[0], params.backbone, cfg, "linear_probe")
        probe = fit_probe(features[:len(train[0])], train[1], params.fine_tune.linear_probe, params.fine_tune.seed)
        accuracy[name] = float(probe.score(features[len(train[0]):], test[1]))
    return accuracy


def bench_ours(params: Params, train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray],
               labels: list[str], epochs: int) -> dict[str, Any]:
    """LP-FT as `stages.fine_tune.train_candidate` does it for strategy 'finetune', without validation (and without
    the opt-in contrastive warm-up or self-training: the `Trainer` peer has neither)."""
    ft, seed = params.fine_tune, params.fine_tune.seed
    cfg = ft.finetune.model_copy(update={"epochs": epochs})
    start = time.perf_counter()
    features, _ = extract_features(train[0], params.backbone, params.extract_features, "finetune")
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    probe = fit_probe(features, train[1], ft.linear_probe, seed)
    probe_s = time.perf_counter() - start
    head = head_from_sklearn(probe.coef_, probe.intercept_)
    seed_everything(seed)
    tokenizer, encoder = load_encoder(params.backbone.name, select_device(), params.backbone.revision)
    train_log = finetune(encoder, tokenizer, head, cfg, train, None, seed)
    info = {"labels": labels, "max_length": cfg.max_length, "backbone": params.backbone.name, "strategy": "finetune"}
    with tempfile.TemporaryDirectory() as folder:
        save_model(Path(folder), head.cpu(), info, encoder=encoder.cpu(), tokenizer=tokenizer)
        classifier = TextClassifier(Path(folder))
        predicted = classifier.predict_proba(test[0]).argmax(axis=1)
    rows = len(train[0]) * len(train_log.epochs)
    return {"train_s": train_log.seconds, "samples_per_s": train_log.samples_per_second,
            "probe_extract_s": extract_s, "probe_fit_s": probe_s,
            "samples_per_s_incl_probe": rows / (train_log.seconds + extract_s + probe_s),
            "epochs": train_log.epochs,
            "test_accuracy": float((predicted == test[1]).mean())}


class _Tokenized(torch.utils.data.Dataset):
    def __init__(self, tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> None:
        self.encoded = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": int(self.labels[i])}


def bench_peer(params: Params, train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray],
               n_labels: int, epochs: int) -> dict[str, Any]:
    """transformers.Trainer with the same hyperparameters; only trainer.train() is timed."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    cfg, seed, device = params.fine_tune.finetune, params.fine_tune.seed, select_device()
    path = resolve_backbone(params.backbone.name, params.backbone.revision)
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder, num_train_epochs=epochs, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size * 2, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, max_grad_norm=1.0,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            use_cpu=device.type == "cpu", bf16=bf16_training(device),
            fp16=device.type == "cuda" and not bf16_training(device), seed=seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_Tokenized(tokenizer, *train, cfg.max_length),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        logits = trainer.predict(_Tokenized(tokenizer, *test, cfg.max_length)).predictions
    return {"train_s": seconds, "samples_per_s": len(train[0]) * epochs / seconds,
            "test_accuracy": float((np.asarray(logits).argmax(axis=1) == test[1]).mean())}


def machine() -> dict[str, Any]:
    import sentence_transformers

    gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {**gpu, "processor": platform.processor() or platform.machine(), "cpu_model": names[0] if names else "",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_hardware": native_bf16_cpu(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version()}


def table_rows(result: dict[str, Any]) -> list[Row]:
    ex, ours, peer = result["extract"], result["finetune"]["ours"], result["finetune"]["peer"]
    st, tr = "sentence-transformers encode (fp32)", "transformers.Trainer"
    rows: list[Row] = []
    for name in ex.get("modes", MODES):
        rows.append((f"extract {name} texts/s", ex[name]["texts_per_s"], ex["peer_texts_per_s"], st))
        if "texts_per_s_median" in ex[name]:  # reports written before 2026-12-07 have the best run only
            rows.append((f"extract {name} texts/s, median", ex[name]["texts_per_s_median"],
                         ex["peer_texts_per_s_median"], st))
        rows.append((f"extract {name} min cosine", ex[name]["min_cosine"], 1.0, st))
    if "fp32_ceiling" in ex:
        rows.append(("extract fp32 ceiling texts/s", ex["fp32_ceiling"]["texts_per_s"], ex["peer_texts_per_s"], st))
    if "peer_bf16" in ex:
        bf = "sentence-transformers encode (bf16 weights)"
        rows.append(("extract torch_bf16 texts/s", ex["torch_bf16"]["texts_per_s"], ex["peer_bf16"]["texts_per_s"], bf))
    for name, accuracy in result.get("downstream", {}).items():
        rows.append((f"probe accuracy on {name}", accuracy, result["downstream"]["torch_fp32"], "our torch_fp32"))
    return rows + [
        ("fine-tune samples/s", ours["samples_per_s"], peer["samples_per_s"], tr),
        ("fine-tune samples/s incl. probe", ours["samples_per_s_incl_probe"], peer["samples_per_s"], tr),
        ("fine-tune test accuracy", ours["test_accuracy"], peer["test_accuracy"], tr),
    ]


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'benchmark':<36}{'ours':>12}{'peer':>12}{'ratio':>8}  peer")
    for name, ours, peer, what in table_rows(result):
        print(f"{name:<36}{ours:>12.7g}{peer:>12.7g}{'x%.3f' % (ours / peer):>8}  {what}")
    ex, ft = result["extract"], result["finetune"]
    batch = f", batches of {ex['batch_size']} (ours and the peer's)" if "batch_size" in ex else ""  # since 2026-12-07
    print(f"\nextract: {ex['rows']} movie train texts{batch}, best (and median) of {ex['repeats']} interleaved runs; "
          "ours incl. model load (and ONNX export): " + ", ".join(f"{m} {ex[m]['texts_per_s_incl_load']:.1f}" for m in ex.get("modes", MODES))
          + " texts/s")
    if "fp32_ceiling" in ex:
        ceiling = ex["fp32_ceiling"]
        print(f"fp32 ceiling: {ceiling['linear_gflop']:.0f} GFLOP of linear layers over {ceiling['tokens']} real "
              f"tokens at {ceiling['matmul_gflops']:.0f} GFLOP/s (fp32 `linear` measured here) = "
              f"{ceiling['texts_per_s']:.0f} texts/s; torch_fp32 runs at "
              f"{ex['torch_fp32']['texts_per_s'] / ceiling['texts_per_s']:.0%} of it")
    if "downstream" in result:
        print(f"downstream: linear probe on all {result['downstream_rows'][0]} train rows, scored on "
              f"{result['downstream_rows'][1]} test rows, features from each mode")
    print(f"fine-tune: {ft['train_rows']} train rows, {ft['epochs']} epochs, {ft['test_rows']} test rows, no "
          f"validation in either loop; our probe step: extract {ft['ours']['probe_extract_s']:.1f}s + fit "
          f"{ft['ours']['probe_fit_s']:.2f}s")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--extract-rows", type=int, help="texts to embed (default 2048; --quick 256)")
    parser.add_argument("--train-rows", type=int, help="fine-tune rows (default 1024; --quick 128)")
    parser.add_argument("--bf16-rows", type=int, default=256,
                        help="texts embedded in bf16 on a CPU without bf16 hardware (default 256)")
    parser.add_argument("--repeats", type=int, help="extraction runs, best kept (default 3; --quick 2)")
    parser.add_argument("--test-rows", type=int, help="test rows (default all; --quick 200)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs, both loops (default 3)")
    parser.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=True,
                        help="probe accuracy on every training row per extraction mode (default on; off with --quick)")
    parser.add_argument("--batch-size", type=int,
                        help="extraction batch size, ours and the peer's (default: params.yaml's extract_features)")
    args = parser.parse_args()
    n_extract = args.extract_rows or (256 if args.quick else 2048)
    n_train = args.train_rows or (128 if args.quick else 1024)
    n_test = args.test_rows or (200 if args.quick else None)
    repeats = args.repeats or (2 if args.quick else 3)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params = load_params()
    if args.batch_size is not None:  # validated like params.yaml's own value
        extract = ExtractConfig.model_validate(params.extract_features.model_dump() | {"batch_size": args.batch_size})
        params = params.model_copy(update={"extract_features": extract})
    seed = params.fine_tune.seed
    splits, labels = load_splits(params)
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    device = select_device()
    result["extract"] = bench_extract(params, subset(splits, "train", n_extract, seed)[0], repeats,
                                      args.bf16_rows, device)
    if args.downstream and not args.quick:
        all_train, all_test = subset(splits, "train", None, seed), subset(splits, "test", None, seed)
        downstream = [name for name in modes_for(device) if not (name == "torch_bf16" and bf16_emulated(device))]
        result["downstream"] = bench_downstream(params, all_train, all_test, downstream)
        result["downstream_rows"] = [len(all_train[0]), len(all_test[0])]
    train, test = subset(splits, "train", n_train, seed), subset(splits, "test", n_test, seed)
    if device.type == "cuda":  # untimed: kernel loading and per-shape set-up, paid once per process, for both loops
        warm = (train[0][:128], train[1][:128]), (test[0][:64], test[1][:64])
        bench_ours(params, *warm, labels, 1)
        bench_peer(params, *warm, len(labels), 1)
    result["finetune"] = {"train_rows": len(train[0]), "test_rows": len(test[0]), "epochs": args.epochs,
                          "ours": bench_ours(params, train, test, labels, args.epochs),
                          "peer": bench_peer(params, train, test, len(labels), args.epochs)}
    result["table"] = [dict(zip(("benchmark", "ours", "peer", "peer_is"), row)) for row in table_rows(result)]
    print_table(result)
    if args.out:
        write_report(result, args.out)


if __name__ == "__main__":
    main()
