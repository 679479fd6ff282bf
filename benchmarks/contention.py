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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import write_report
from benchmarks.run import load_splits, machine, subset

POLICIES = {"default (spin)": None, "OMP_WAIT_POLICY=PASSIVE": "PASSIVE"}  # OMP_WAIT_POLICY: None unsets it


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


def run_at_once(copies: int, rows: int, policy: str | None) -> list[float]:
    """Samples/s of each of `copies` worker processes started together, with OMP_WAIT_POLICY set to `policy`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    with tempfile.TemporaryDirectory() as folder:
        logs = [Path(folder) / f"worker{i}.log" for i in range(copies)]
        workers = [subprocess.Popen([sys.executable, "-m", "benchmarks.contention", "--worker", "--rows", str(rows)],
                                    env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True) for log in logs]
        outputs = [worker.communicate()[0] for worker in workers]
        for worker, log in zip(workers, logs):
            if worker.returncode != 0:
                raise RuntimeError(f"a fine-tuning worker exited {worker.returncode}:\n{log.read_text()[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1])["samples_per_s"] for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="training rows per run (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, choices=range(1, 21), metavar="1..20",
                        help="runs alone per policy, alternating (median kept)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report to write")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"samples_per_s": train_once(args.rows)}))
        return
    alone: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for _ in range(args.repeats):
        for policy, value in POLICIES.items():
            alone[policy] += run_at_once(1, args.rows, value)
    results: dict[str, dict[str, Any]] = {}
    for policy, value in POLICIES.items():
        pair = run_at_once(2, args.rows, value)
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
