"""Accuracy with few labels: the data-efficiency study at fixed budgets, LP-FT vs linear probe vs no transfer.

Runs `stages.data_efficiency.run_curve` in-process on the project's splits and features (run `dvc repro` first)
for each strategy, with the budgets and seeds given here instead of params.yaml's, and prints the mean accuracy per
budget next to issue 4's targets. Figures are means over the seeds (one draw per seed).

`--grid KEY=V1,V2,...` repeats the run once per value of one params.yaml key; with `--scored-split val` that is how
a default is chosen without looking at the test split:

    python -m benchmarks.accuracy --strategies finetune --budgets 64 --scored-split val \\
        --grid fine_tune.finetune.min_steps=20,40,80

`--set KEY=VALUE` (repeatable) fixes a fine_tune.* knob for every run without editing params.yaml, like
`dvc exp run -S`: `--set fine_tune.self_training.epochs=1 --grid fine_tune.self_training.rounds=2,3`.

Run from the project root:  python -m benchmarks.accuracy [--budgets 64 512] [--seeds 0 1 2 3 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import ValidationError

from benchmarks import set_key, write_report
from stages.config import Params, load_params
from stages.data_efficiency import run_curve, summarize
from stages.fine_tune import pinned_to_features
from stages.io import META_FILE, load_features, read_json

TARGETS = {64: 0.76, 512: 0.80}


def parse_grid(spec: str | None) -> tuple[str | None, list[Any]]:
    """`a.b.c=1,2,3` -> ("a.b.c", [1, 2, 3]) (values parsed as YAML); None -> (None, [None])."""
    if spec is None:
        return None, [None]
    key, sep, values = spec.partition("=")
    if not sep or not values:
        raise SystemExit(f"--grid {spec!r}: expected KEY=V1,V2,... such as fine_tune.finetune.min_steps=20,40")
    return key, [yaml.safe_load(value) for value in values.split(",")]


def parse_set(spec: str) -> tuple[str, Any]:
    """`a.b.c=1` -> ("a.b.c", 1) (the value parsed as YAML)."""
    key, sep, value = spec.partition("=")
    if not sep or not value:
        raise SystemExit(f"--set {spec!r}: expected KEY=VALUE such as fine_tune.self_training.epochs=1")
    return key, yaml.safe_load(value)


def override(params: Params, key: str, value: Any) -> Params:
    """`params` with the dotted `key` set to `value`, validated like params.yaml itself. Only fine_tune's training
    knobs can vary: features are read once from disk, and budgets, seeds and strategy are this command's options."""
    parents = key.split(".")[:-1]
    if parents[:1] != ["fine_tune"] or key == "fine_tune.strategy":
        raise SystemExit(f"--grid/--set {key}: only fine_tune.* keys (not fine_tune.strategy: use --strategies) can vary")
    if parents[1:2] == ["blend"]:
        raise SystemExit(f"--grid/--set {key}: the draws here have no validation rows to choose a blend on, so they "
                         "never blend; measure fine_tune.blend with the pipeline (dvc exp run)")
    data = params.model_dump(mode="json")
    set_key(data, key, value)
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise SystemExit(f"--grid/--set {key}={value!r}: {error.errors()[0]['msg']}") from None


def params_with(sets: list[str]) -> Params:
    """params.yaml with each `--set KEY=VALUE` applied, pinned to the features on disk (what they were made with)."""
    params = load_params()
    for key, value in map(parse_set, sets):
        params = override(params, key, value)
    return pinned_to_features(params, read_json(params.paths.features / META_FILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 512], help="labelled rows per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=["linear_probe", "finetune"])
    parser.add_argument("--scored-split", choices=["test", "val"], default="test",
                        help="the split every model is scored on (val: for choosing hyperparameters)")
    parser.add_argument("--grid", help="KEY=V1,V2,...: one run per value of this params.yaml key")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a fine_tune.* params.yaml key for every run (repeatable)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    base = params_with(args.set)
    splits = pd.read_parquet(base.paths.splits)
    features = load_features(base.paths.features)
    grid_key, grid_values = parse_grid(args.grid)
    rows, seconds = [], {}
    for value in grid_values:
        params = base if grid_key is None else override(base, grid_key, value)
        for strategy in args.strategies:
            cfg = params.data_efficiency.model_copy(update={"labels_per_class": args.budgets, "seeds": args.seeds,
                                                            "strategy": strategy})
            start = time.perf_counter()
            curve = summarize(run_curve(params.model_copy(update={"data_efficiency": cfg}), splits, features,
                                        args.scored_split))
            name = strategy if grid_key is None else f"{strategy} {grid_key}={value}"
            seconds[name] = round(time.perf_counter() - start, 1)
            extra = {} if grid_key is None else {grid_key: value}
            rows += [{"strategy": strategy, **extra, **row} for row in curve.to_dict(orient="records")]
    table = pd.DataFrame(rows)
    table["target"] = table["labels_per_class"].map(TARGETS)
    shown = ["strategy", *([grid_key] if grid_key else []), "labels_per_class", "draws", "transfer_accuracy",
             "transfer_accuracy_std", "baseline_accuracy", "gain", "target"]
    print(f"scored on the {args.scored_split} split")
    print(table[shown].to_string(index=False))
    print(f"seconds per run (all budgets and seeds, this machine): {seconds}")
    if args.out:
        record = {"budgets": args.budgets, "seeds": args.seeds, "scored_split": args.scored_split, "set": args.set,
                  "grid": args.grid, "seconds": seconds, "rows": rows}
        write_report(record, args.out)


if __name__ == "__main__":
    main()
