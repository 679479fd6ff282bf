"""Batch prediction: score a file of texts with a registry version (default: the current @champion)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import pandas as pd

from stages.config import load_params
from stages.errors import PipelineError
from stages.ingest import detect_format, read_table, row_places
from stages.io import atomic_path, log, run_main
from stages.registry import CHAMPION, configure_mlflow
from stages.rows import bad_rows, blank


def batch_predict(model_uri: str, frame: pd.DataFrame, text_column: str, source: Path, fmt: str) -> pd.DataFrame:
    if text_column not in frame.columns:
        raise PipelineError(f"{source}: column {text_column!r} not found; columns are {list(map(str, frame.columns))}")
    texts = frame[text_column].reset_index(drop=True)
    missing = blank(texts)
    if missing.any():  # a prediction for no text would look like an answer
        raise PipelineError(f"{source}: column {text_column!r} is empty or null in "
                            f"{bad_rows(missing, row_places(source, fmt, len(texts)))}; fill or drop those rows")
    model = mlflow.pyfunc.load_model(model_uri)
    scored = model.predict(pd.DataFrame({"text": texts.astype(str)}))
    # The input may carry its own `label` (a labelled test file): keep both, the prediction renamed.
    scored = scored.rename(columns={c: f"predicted_{c}" for c in scored.columns if c in frame.columns})
    return pd.concat([frame.reset_index(drop=True), scored.reset_index(drop=True)], axis=1)


def write_table(frame: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        if target.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif target.suffix == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True)
        else:
            frame.to_csv(tmp, index=False, sep="\t" if target.suffix == ".tsv" else ",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, required=True, help="CSV, TSV, Parquet or JSONL file")
    parser.add_argument("--output", type=Path, required=True, help="where to write the scored rows (same formats)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--model-uri", default=None, help="default: models:/<register.model_name>@champion")
    args = parser.parse_args()
    configure_mlflow()
    uri = args.model_uri or f"models:/{load_params().register.model_name}@{CHAMPION}"
    if not args.input.is_file():
        raise PipelineError(f"--input {args.input} does not exist")
    fmt = detect_format(args.input, "auto")
    frame = read_table(args.input, fmt)
    scored = batch_predict(uri, frame, args.text_column, args.input, fmt)
    write_table(scored, args.output)
    log.info("batch_predict: %d rows scored with %s -> %s", len(scored), uri, args.output)


if __name__ == "__main__":
    run_main(main)
