"""Where exact fp32 extraction spends its time: `stages.backbone.embed` under `torch.profiler`, op by op.

Embeds the same 2,048 movie training texts as `benchmarks.run` (fp32, the batch size and max length of params.yaml)
once to warm up, once under the profiler, and prints each op's share of the time, then the rate of the matrix
products (`aten::addmm`: the linear layers) in GFLOP/s, to set against the fp32 ceiling `benchmarks.run` prints.

It profiles one thread: `embed` gives each of torch's threads whole batches with one intra-op thread, in worker
threads the profiler does not record, so one thread doing every batch is what each of them does.

Run from the project root:  python -m benchmarks.profile_extract [--rows 2048]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.run import linear_flop_per_token, load_splits, subset
from stages.backbone import embed, length_batches, load_encoder
from stages.config import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="texts to embed")
    args = parser.parse_args()
    params = load_params()
    texts = subset(load_splits(params)[0], "train", args.rows, params.fine_tune.seed)[0]
    tokenizer, model = load_encoder(params.backbone.name, torch.device("cpu"), params.backbone.revision)
    options = {"max_length": params.backbone.max_length, "batch_size": params.extract_features.batch_size,
               "precision": "fp32"}
    torch.set_num_threads(1)
    embed(texts, tokenizer, model, **options)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        embed(texts, tokenizer, model, **options)
        wall = time.perf_counter() - start
    ops = prof.key_averages()
    print(f"{'op (share of the wall-clock time of embed)':<52}{'share':>8}{'ms':>10}")
    for op in sorted(ops, key=lambda op: op.self_cpu_time_total, reverse=True)[:12]:
        print(f"{op.key:<52}{op.self_cpu_time_total / 1e6 / wall:>8.1%}{op.self_cpu_time_total / 1e3:>10.1f}")
    outside = wall - sum(op.self_cpu_time_total for op in ops) / 1e6
    print(f"{'outside torch ops (tokenizer, Python, profiler)':<52}{outside / wall:>8.1%}{outside * 1e3:>10.1f}")
    ids = tokenizer(texts, truncation=True, max_length=params.backbone.max_length)["input_ids"]
    padded = sum(len(batch) * max(len(ids[i]) for i in batch)
                 for batch in length_batches([len(x) for x in ids], params.extract_features.batch_size))
    addmm = sum(op.self_cpu_time_total for op in ops if op.key == "aten::addmm") / 1e6
    gflop = padded * linear_flop_per_token(model) / 1e9
    print(f"\n{len(texts)} texts, {padded} tokens with padding ({padded / sum(map(len, ids)):.3f}x the real ones): "
          f"the linear layers do {gflop:.0f} GFLOP in {addmm:.2f} s of addmm = {gflop / addmm:.0f} GFLOP/s; "
          f"embed took {wall:.2f} s on one thread under the profiler ({len(texts) / wall:.0f} texts/s)")


if __name__ == "__main__":
    main()
