"""Accuracy with few labels: the data-efficiency study at fixed budgets, LP-FT vs linear probe vs no transfer.

Runs `stages.data_efficiency.run_curve` in-process on the project's splits and features (run `dvc repro` first)
for each strategy, with the budgets and seeds given here instead of params.yaml's, and prints the mean test
accuracy per budget next to issue 4's targets. Figures are means over the seeds (one draw per seed).

Run from the project root:  python -m benchmarks.accuracy [--budgets 64 512] [--seeds 0 1 2 3 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from stages.config import load_params
from stages.data_efficiency import run_curve, summarize
from stages.extract_features import load_features

TARGETS = {64: 0.76, 512: 0.80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 512], help="labelled rows per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=["linear_probe", "finetune"])
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    params = load_params()
    splits = pd.read_parquet(params.paths.splits)
    features = load_features(params.paths.features)
    rows, seconds = [], {}
    for strategy in args.strategies:
        cfg = params.data_efficiency.model_copy(update={"labels_per_class": args.budgets, "seeds": args.seeds,
                                                        "strategy": strategy})
        start = time.perf_counter()
        curve = summarize(run_curve(params.model_copy(update={"data_efficiency": cfg}), splits, features))
        seconds[strategy] = round(time.perf_counter() - start, 1)
        rows += [{"strategy": strategy, **row} for row in curve.to_dict(orient="records")]
    table = pd.DataFrame(rows)
    table["target"] = table["labels_per_class"].map(TARGETS)
    print(table[["strategy", "labels_per_class", "draws", "transfer_accuracy", "transfer_accuracy_std",
                 "baseline_accuracy", "gain", "target"]].to_string(index=False))
    print(f"seconds per strategy (all budgets and seeds, this machine): {seconds}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"budgets": args.budgets, "seeds": args.seeds, "seconds": seconds,
                                        "rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
