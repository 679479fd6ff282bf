"""What sharing the CPU costs fine-tuning: the LP-FT loop alone, then two copies at once, under torch's default
OpenMP wait policy (threads spin between parallel regions) and under `OMP_WAIT_POLICY=PASSIVE` (they sleep).

Each run is a fresh process training `stages.finetune_loop.finetune` for one epoch on `--rows` movie training rows
(params.yaml's fine-tuning settings; a zero head, so no probe step), which prints its samples/s. Spinning threads are
the fastest way to wait on an idle machine and the slowest when another busy process holds the cores they spin on:
a user whose stages share the cores with other work reads here what `OMP_WAIT_POLICY=PASSIVE` buys and costs.

The runs alone alternate between the policies `--repeats` times and report the median, since one run alone moved
by 10% to 20% from one to the next here; the two-at-once runs go once per policy.

Run from the project root:  python -m benchmarks.contention [--rows 1024] [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.run import load_splits, machine, subset

POLICIES = {"default (spin)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def train_once(rows: int) -> float:
    """Samples/s of one epoch of the LP-FT loop in this process."""
    from stages.backbone import load_encoder, select_device
    from stages.config import load_params
    from stages.finetune_loop import finetune, seed_everything
    from stages.model import head_from_sklearn

    params = load_params()
    train = subset(load_splits(params)[0], "train", rows, params.fine_tune.seed)
    cfg = params.fine_tune.finetune.model_copy(update={"epochs": 1})
    seed_everything(params.fine_tune.seed)
    tokenizer, encoder = load_encoder(params.backbone.name, select_device(), params.backbone.revision)
    labels = len(set(train[1].tolist()))
    head = head_from_sklearn(np.zeros((labels, encoder.config.hidden_size), np.float32), np.zeros(labels, np.float32))
    return finetune(encoder, tokenizer, head, cfg, train, None, params.fine_tune.seed).samples_per_second


def run_at_once(copies: int, rows: int, env: dict[str, str]) -> list[float]:
    """Samples/s of each of `copies` worker processes started together."""
    workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.contention", "--worker", "--rows", str(rows)],
                                env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for _ in range(copies)]
    rates = []
    for worker in workers:
        out, _ = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"a fine-tuning worker exited {worker.returncode}")
        rates.append(json.loads(out.strip().splitlines()[-1])["samples_per_s"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="training rows per run (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="runs alone per policy, alternating (median kept)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report to write")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"samples_per_s": train_once(args.rows)}))
        return
    alone: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for _ in range(args.repeats):
        for policy, env in POLICIES.items():
            alone[policy] += run_at_once(1, args.rows, env)
    results: dict[str, dict[str, Any]] = {}
    for policy, env in POLICIES.items():
        pair = run_at_once(2, args.rows, env)
        results[policy] = {"alone": round(statistics.median(alone[policy]), 1),
                           "alone_runs": [round(r, 1) for r in alone[policy]],
                           "two_at_once_each": [round(r, 1) for r in pair], "two_at_once_total": round(sum(pair), 1)}
    print(f"{'fine-tuning, samples/s':<28}{'alone (median)':>15}{'two at once: each':>22}{'together':>10}")
    for policy, row in results.items():
        each = " / ".join(f"{r:.1f}" for r in row["two_at_once_each"])
        print(f"{policy:<28}{row['alone']:>15.1f}{each:>22}{row['two_at_once_total']:>10.1f}")
    if args.out:
        write_report({"command": "python -m benchmarks.contention", "rows": args.rows, "repeats": args.repeats,
                      "machine": machine(), "results": results}, args.out)


if __name__ == "__main__":
    main()
