"""Seed spread of the pipeline's test metrics: the same params, several `fine_tune.seed` values, one DVC experiment each.

The split (preprocess.seed) stays fixed; the seed changes the probe, the batch order and the head, so the spread is
what the fine-tuning itself moves. Each seed runs `dvc exp run --temp -n NAME-seedS -S fine_tune.seed=S` plus the
`--set` overrides (an earlier experiment of the same name is removed first), then every figure is read back from
`dvc exp show --json`. Run from the project root, after `dvc repro`:

    python -m benchmarks.seeds --set fine_tune.finetune.epochs=3 --seeds 0 1 2 3 4 [--out reports/FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import write_report

FIGURES = {  # printed name -> (metrics file, keys into it)
    "test_accuracy": ("metrics/metrics.json", ("test", "candidate_accuracy")),
    "unblended_test_accuracy": ("metrics/metrics.json", ("test", "unblended_accuracy")),
    "val_accuracy": ("metrics/training.json", ("val_accuracy",)),
    "blend_weight": ("metrics/training.json", ("blend_weight",)),
    "best_epoch": ("metrics/training.json", ("best_epoch",)),
    "fine_tune_seconds": ("metrics/training_speed.json", ("seconds",)),
}


def run_experiment(name: str, seed: int, overrides: list[str]) -> None:
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True, check=False)
    sets = [arg for kv in [*overrides, f"fine_tune.seed={seed}"] for arg in ("-S", kv)]
    subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *sets], check=True)


def experiments_by_name(show: Any) -> dict[str, dict]:
    """Every experiment in `dvc exp show --json` output that has a name and metrics, by name."""
    found: dict[str, dict] = {}
    stack = [show]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("name") and node.get("rev") and (node.get("data") or {}).get("metrics"):
                found[node["name"]] = node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def figures(experiment: dict) -> dict[str, Any]:
    metrics = experiment["data"]["metrics"]
    out: dict[str, Any] = {"experiment": experiment["rev"]}
    for figure, (path, keys) in FIGURES.items():
        value: Any = (metrics.get(path) or {}).get("data")
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        out[figure] = value
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for figure in ("test_accuracy", "unblended_test_accuracy"):
        values = [run[figure] for run in runs if run[figure] is not None]
        if values:
            out[f"mean_{figure}"] = round(statistics.mean(values), 4)
            out[f"std_{figure}"] = round(statistics.pstdev(values), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for every run, as `dvc exp run -S` takes it (repeatable)")
    parser.add_argument("--name", default="seeds", help="experiment names: NAME-seedS")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    names = {seed: f"{args.name}-seed{seed}" for seed in args.seeds}
    for seed, name in names.items():
        run_experiment(name, seed, args.set)
    show = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    found = experiments_by_name(show)
    runs = [{"seed": seed, **figures(found[name])} for seed, name in names.items()]
    for run in runs:
        print(run)
    record = {"command": "python -m benchmarks.seeds " + " ".join([*(f"--set {kv}" for kv in args.set), "--seeds",
                                                                    *map(str, args.seeds)]),
              "runs": runs, **summary(runs)}
    print({k: v for k, v in record.items() if k != "runs"})
    if args.out:
        write_report(record, args.out)


if __name__ == "__main__":
    main()
