"""Few-shot accuracy against SetFit: the same draws of N labelled rows per class, side by side in one run.

SetFit (the `setfit` package, Tunstall et al. 2022) trains the same backbone contrastively on pairs of the drawn rows
(`--iterations` positive and negative pairs per row, one epoch, its default learning rates), then fits its logistic
regression head on the tuned embeddings. Ours is the data-efficiency study's draw with the pipeline's `finetune`
(LP-FT) settings from params.yaml (`--set` changes them, as in `benchmarks.accuracy`), and the no-transfer baseline.
Every model sees the same rows and is scored on the same split; SetFit keeps its own token limit (the body's 256;
ours is fine_tune.finetune.max_length, 64).
Our seconds include the baseline's fits but not extract_features, which the pipeline runs once for every row.
Run `dvc repro extract_features` first (LP-FT starts from a probe on the pipeline's features).

Run from the project root:  python -m benchmarks.setfit_peer [--budgets 64] [--seeds 0 1 2 3 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import write_report
from benchmarks.accuracy import params_with
from stages.config import Params
from stages.data_efficiency import draws, run_curve
from stages.hub import resolve_backbone
from stages.io import load_features


def train_setfit(params: Params, rows: pd.DataFrame, iterations: int, seed: int) -> Any:
    """A SetFit model of the backbone trained on `rows` with its own defaults (batch 16, one epoch); its checkpoints
    go to a scratch folder that is removed, so nothing is left in the working directory."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    model = SetFitModel.from_pretrained(str(resolve_backbone(params.backbone.name, params.backbone.revision)))
    train = Dataset.from_dict({"text": rows["text"].tolist(), "label": rows["label_id"].tolist()})
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, save_strategy="no", report_to="none", seed=seed,
                                 num_iterations=iterations, num_epochs=1, batch_size=16)
        Trainer(model=model, args=args, train_dataset=train).train()
    return model


def setfit_accuracy(params: Params, rows: pd.DataFrame, scored: pd.DataFrame, iterations: int, seed: int) -> float:
    model = train_setfit(params, rows, iterations, seed)
    predicted = np.asarray(model.predict(scored["text"].tolist(), batch_size=64))
    return float((predicted == scored["label_id"].to_numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64], help="labelled rows per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, default=20, help="SetFit's pairs per labelled row (its paper's 20)")
    parser.add_argument("--scored-split", choices=["test", "val"], default="test")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a fine_tune.* params.yaml key for our runs (repeatable)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args()
    params = params_with(args.set)
    splits = pd.read_parquet(params.paths.splits)
    train, scored = splits[splits["split"] == "train"], splits[splits["split"] == args.scored_split]
    cfg = params.data_efficiency.model_copy(update={"labels_per_class": args.budgets, "seeds": args.seeds,
                                                    "strategy": "finetune"})
    start = time.perf_counter()
    ours = run_curve(params.model_copy(update={"data_efficiency": cfg}), splits, load_features(params.paths.features),
                     args.scored_split)
    seconds = {"ours": round(time.perf_counter() - start, 1)}
    start, setfit = time.perf_counter(), []
    for budget in args.budgets:
        for seed, rows in draws(train, budget, args.seeds):
            setfit.append({"labels_per_class": budget, "seed": seed,
                           "setfit_accuracy": setfit_accuracy(params, rows, scored, args.iterations, seed)})
            print(setfit[-1], flush=True)
    seconds["setfit"] = round(time.perf_counter() - start, 1)
    points = ours.merge(pd.DataFrame(setfit), on=["labels_per_class", "seed"], validate="one_to_one")
    if len(points) != len(ours):
        raise SystemExit(f"--budgets {args.budgets}: SetFit's draws are not ours (a budget at or above a class's size "
                         "is one draw of every row for both; give each budget once, below the largest class)")
    points = points.rename(columns={"transfer_accuracy": "ours_accuracy"})
    shown = ["ours_accuracy", "setfit_accuracy", "baseline_accuracy"]
    grouped = points.groupby("labels_per_class")[shown]
    table = grouped.mean().join(grouped.std(ddof=0), suffixes=("", "_std")).round(4)
    st, pairs = params.fine_tune.self_training, params.fine_tune.contrastive.pairs_per_row
    print(f"scored on the {args.scored_split} split; ours = "
          + (f"a contrastive warm-up ({pairs} pairs per row) + " if pairs else "") + "LP-FT"
          + (f" + self-training ({st.rounds} round(s) of {st.epochs} epoch(s))" if st.epochs else ""))
    print(points[["labels_per_class", "seed", *shown]].round(4).to_string(index=False))
    print(table.to_string())
    print(f"seconds (all budgets and seeds, this machine): {seconds}")
    if args.out:
        write_report({"budgets": args.budgets, "seeds": args.seeds, "iterations": args.iterations,
                      "scored_split": args.scored_split, "set": args.set, "seconds": seconds,
                      "points": points.to_dict(orient="records")}, args.out)


if __name__ == "__main__":
    main()
