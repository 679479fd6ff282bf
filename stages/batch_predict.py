"""Batch prediction: score a file of texts with a registry version (default: the current @champion)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

from stages.config import PARAMS_FILE, load_params
from stages.errors import PipelineError
from stages.ingest import detect_format, read_table, row_places
from stages.io import atomic_path, log, run_main
from stages.registry import CHAMPION, configure_mlflow
from stages.texts import bad_rows, blank, not_text

FORMATS = {".csv", ".tsv", ".parquet", ".jsonl"}


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        if error.error_code not in {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}:
            raise
        raise PipelineError(f"--model-uri {model_uri}: {error.message}; `mlflow ui` lists the registered models, "
                            "their versions and aliases") from None


def batch_predict(model_uri: str, frame: pd.DataFrame, text_column: str, source: Path, fmt: str) -> pd.DataFrame:
    if text_column not in frame.columns:
        raise PipelineError(f"{source}: column {text_column!r} not found; columns are {list(map(str, frame.columns))}")
    texts = frame[text_column].reset_index(drop=True)
    missing = blank(texts)
    if missing.any():  # a prediction for no text would look like an answer
        raise PipelineError(f"{source}: column {text_column!r} is empty or null in "
                            f"{bad_rows(missing, row_places(source, fmt, len(texts)))}; fill or drop those rows")
    if (other := not_text(texts)).any():
        raise PipelineError(f"{source}: column {text_column!r} holds values that are not text (numbers, lists) in "
                            f"{bad_rows(other, row_places(source, fmt, len(texts)))}")
    model = load_model(model_uri)
    # The input may carry its own `label` (a labelled test file): keep both, the prediction renamed.
    schema = model.metadata.get_output_schema()
    outputs = schema.input_names() if schema else []
    renamed = {c: f"predicted_{c}" for c in outputs if c in frame.columns}
    if clash := sorted(set(renamed.values()) & set(map(str, frame.columns))):
        raise PipelineError(f"{source}: has columns {clash} as well as {sorted(renamed)}, so the predictions would "
                            "have no column of their own; rename or drop them")
    scored = model.predict(pd.DataFrame({"text": texts}))
    scored = scored.rename(columns=renamed)
    return pd.concat([frame.reset_index(drop=True), scored.reset_index(drop=True)], axis=1)


def check_paths(source: Path, target: Path) -> None:
    """Before anything is scored: an input that is there and an output that is neither it nor of a format that
    cannot be written."""
    if source.is_dir():
        raise PipelineError(f"--input {source} is a folder; give a CSV, TSV, Parquet or JSONL file")
    if not source.is_file():
        raise PipelineError(f"--input {source} does not exist")
    if target.suffix.lower() not in FORMATS:
        raise PipelineError(f"--output {target}: write {', '.join(sorted(FORMATS))}, by its suffix")
    if target.resolve() == source.resolve():
        raise PipelineError(f"--output {target} is the input file; write the scored rows elsewhere")


def check_registry_is_known(model_uri: str | None) -> None:
    """Outside the project, without MLFLOW_TRACKING_URI, MLflow would make and search an empty mlflow.db here (a
    runs:/ or models:/ URI needs the registry; a model folder does not)."""
    needs_registry = model_uri is None or model_uri.startswith(("models:/", "runs:/"))
    if needs_registry and not os.environ.get("MLFLOW_TRACKING_URI") and not Path(PARAMS_FILE).is_file():
        raise PipelineError(f"no {PARAMS_FILE} in {Path.cwd()}: run from the project root, whose registry is its "
                            "mlflow.db, or set MLFLOW_TRACKING_URI to the registry to read")


def write_table(frame: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        suffix = target.suffix.lower()
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True)
        else:  # .csv or .tsv (check_paths)
            frame.to_csv(tmp, index=False, sep="\t" if suffix == ".tsv" else ",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, required=True, help="CSV, TSV, Parquet or JSONL file")
    parser.add_argument("--output", type=Path, required=True, help="where to write the scored rows (same formats)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--model-uri", default=None, help="default: models:/<register.model_name>@champion")
    args = parser.parse_args()
    check_paths(args.input, args.output)
    check_registry_is_known(args.model_uri)
    uri = args.model_uri or f"models:/{load_params().register.model_name}@{CHAMPION}"
    configure_mlflow()
    fmt = detect_format(args.input, "auto")
    frame = read_table(args.input, fmt)
    scored = batch_predict(uri, frame, args.text_column, args.input, fmt)
    write_table(scored, args.output)
    log.info("batch_predict: %d rows scored with %s -> %s", len(scored), uri, args.output)


if __name__ == "__main__":
    run_main(main)
