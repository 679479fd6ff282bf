"""ingest: read the configured source, validate its schema, normalise text, write data/raw + a data report."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from stages.config import DataConfig, load_params
from stages.errors import PipelineError
from stages.io import log, remove_outputs, run_main, write_json, write_parquet
from stages.texts import bad_rows, blank, normalise_text

# sha256 of additional_resources/hutto_ICWSM_2014.tar.gz inside vaderSentiment-3.3.2's sdist.
VADER_INNER_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
VADER_DOMAINS = {
    "movieReviewSnippets": "movie",
    "amazonReviewSnippets": "amazon",
    "tweets": "tweets",
    "nytEditorialSnippets": "nyt",
}
SUFFIX_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".tar.gz": "vader",
}
COLUMNS = ["text", "label", "domain"]


def detect_format(source: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if source.is_dir():
        return "folder"
    suffixes = [s.lower() for s in source.suffixes]
    if suffixes[-2:] == [".tar", ".gz"]:
        return "vader"
    if suffixes and suffixes[-1] == ".gz":  # a compressed table: reviews.csv.gz
        suffixes = suffixes[:-1]
    fmt = SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise PipelineError(
            f"{source}: cannot tell the format from the suffix {source.suffix!r}; "
            "set data.format to csv, tsv, parquet, jsonl, folder or vader"
        )
    return fmt


def decode_text(raw: bytes, where: str) -> str:
    """Strict UTF-8 (BOM allowed); undecodable bytes name the file and line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PipelineError(
            f"{where}: byte {error.start} (line {line}) is not valid UTF-8 "
            f"({raw[error.start:error.start + 1]!r}); re-save the file as UTF-8"
        ) from None


def read_table(source: Path, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        try:
            return pd.read_parquet(source)
        except Exception as error:  # noqa: BLE001 (pyarrow raises several unrelated types for a bad file)
            raise PipelineError(f"{source}: not a readable Parquet file ({error})") from None
    text = read_text(source)
    if not text.strip():
        raise PipelineError(f"{source} is empty: it needs a header and at least two labelled rows")
    buffer = io.StringIO(text)
    try:
        if fmt == "jsonl":
            return pd.read_json(buffer, lines=True, dtype=False)
        frame = pd.read_csv(buffer, dtype=str, keep_default_na=False, na_values=[""], **_dialect(fmt))
    except (ValueError, pd.errors.ParserError) as error:
        where = _first_bad_json_line(text) if fmt == "jsonl" else None
        raise PipelineError(f"{source}: cannot parse as {fmt} ({where or error})") from None
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the first column(s) as the index
        raise PipelineError(f"{source}: {_first_long_line(text, fmt)} has more fields than the header "
                            f"({len(frame.columns)}); quote texts that contain the delimiter")
    return frame


def read_text(source: Path) -> str:
    raw = source.read_bytes()
    if source.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise PipelineError(f"{source}: not a readable gzip file ({error})") from None
    return decode_text(raw, str(source))


def json_lines(text: str) -> list[tuple[int, str]]:
    """The records of a JSONL text with their line numbers: lines split at "\n" only and blank ones skipped, as
    pandas reads them."""
    return [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _first_bad_json_line(text: str) -> str | None:
    """The first line of a JSONL file that is not one JSON object, and why."""
    for number, line in json_lines(text):
        try:
            record = json.loads(line, strict=False)  # pandas, too, takes raw control characters inside strings
        except json.JSONDecodeError as error:
            return f"line {number} is not valid JSON ({error.msg}: column {error.colno})"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {type(record).__name__}, not an object of columns"
    return None


def _dialect(fmt: str) -> dict:
    """How `fmt` splits fields, in the keywords both pandas and Python's csv reader take: tab-separated text has no
    quoting (a quote is part of the text)."""
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}


def _csv_records(text: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """Each record of a CSV/TSV text that pandas reads as a row (the header first) and the line it starts on: lines
    of nothing but spaces are skipped, a quoted field may span lines. csv.Error where Python's csv reader cannot
    follow the file (a field past its size limit)."""
    physical = io.StringIO(text, newline="").readlines()
    delimiter = _dialect(fmt).get("delimiter", ",")
    reader = csv.reader(physical, **_dialect(fmt))
    start = 1
    for record in reader:
        if "".join(physical[start - 1:reader.line_num]).replace(delimiter, "x").strip():
            yield start, record
        start = reader.line_num + 1


def _first_long_line(text: str, fmt: str) -> str:
    """Where the first record with more fields than the header starts: "line N", or "a row" where Python's csv
    reader cannot follow the file."""
    records = _csv_records(text, fmt)
    try:
        _, header = next(records)
        for start, record in records:
            if len(record) > len(header):
                return f"line {start}"
    except (csv.Error, StopIteration):
        pass
    return "a row"


def read_folder(source: Path) -> pd.DataFrame:
    if not source.is_dir():
        raise PipelineError(f"data.format is folder but {source} is not a folder; set data.format: auto")
    files = folder_files(source)
    rows = [{"text": decode_text(file.read_bytes(), str(file)), "label": file.parent.name} for file in files]
    if empty := sorted({p.name for p in class_folders(source)} - {file.parent.name for file in files}):
        log.warning("ingest: class folder(s) %s of %s hold no .txt file: those classes are not in the data", empty,
                    source)
    nested = sorted(set(source.glob("*/**/*.txt")) - set(files))
    if nested:
        log.warning("ingest: %d .txt file(s) in folders below the class folders are not read, e.g. %s", len(nested),
                    nested[0].relative_to(source))
    if not rows:
        raise PipelineError(f"{source}: no <class>/<file>.txt files found; put one sub-folder of .txt files per class")
    return pd.DataFrame(rows)


def class_folders(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_files(source: Path) -> list[Path]:
    """The <class>/*.txt files of a folder source (.TXT too), in the order of its rows."""
    return [file for class_dir in class_folders(source) for file in sorted(class_dir.iterdir())
            if file.is_file() and file.suffix.lower() == ".txt"]


def _decode_lenient(raw: bytes) -> str:
    # The Hutto & Gilbert files mix UTF-8 and cp1252 line by line.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _inner_vader_archive(source: Path) -> bytes:
    try:
        outer = tarfile.open(source, "r:gz")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as error:
        raise PipelineError(f"{source}: not the vaderSentiment 3.3.2 sdist (a .tar.gz): {error}") from None
    with outer:
        names = [m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")]
        if not names:
            raise PipelineError(f"{source}: no additional_resources/hutto_ICWSM_2014.tar.gz inside; "
                                "fetch it with `python -m stages.fetch_default`")
        payload = outer.extractfile(names[0]).read()  # type: ignore[union-attr]
    digest = hashlib.sha256(payload).hexdigest()
    if digest != VADER_INNER_SHA256:
        raise PipelineError(f"{source}: hutto_ICWSM_2014.tar.gz has sha256 {digest}, expected {VADER_INNER_SHA256}")
    return payload


def read_vader(source: Path, neutral_band: float) -> pd.DataFrame:
    """The four *_GroundTruth.txt files: `id<TAB>mean rating<TAB>text`, labelled by the rating's sign."""
    rows = []
    with tarfile.open(fileobj=io.BytesIO(_inner_vader_archive(source)), mode="r:gz") as inner:
        for member in inner.getmembers():
            stem = Path(member.name).name.removesuffix("_GroundTruth.txt")
            if stem not in VADER_DOMAINS or not member.name.endswith("_GroundTruth.txt"):
                continue
            for raw_line in inner.extractfile(member).read().splitlines():  # type: ignore[union-attr]
                parts = _decode_lenient(raw_line).split("\t", 2)
                if len(parts) != 3 or not parts[2].strip():
                    continue
                rating = float(parts[1])
                if abs(rating) <= neutral_band:
                    continue
                label = "positive" if rating > 0 else "negative"
                rows.append({"text": parts[2], "label": label, "domain": VADER_DOMAINS[stem]})
    return pd.DataFrame(rows, columns=COLUMNS)


def row_places(source: Path, fmt: str, rows: int) -> tuple[str, list[str]] | None:
    """Where each of the `rows` rows `read_table` (or `read_folder`) returned comes from, as the user finds it: the
    line of a CSV/TSV/JSONL file it starts on (blank lines are skipped and a quoted field may span lines, as pandas
    reads them), or a folder's file. None for Parquet, or where Python's csv reader does not find pandas' rows."""
    if fmt == "folder":
        return "file(s)", [str(file.relative_to(source)) for file in folder_files(source)]
    if fmt not in {"csv", "tsv", "jsonl"}:
        return None
    text = read_text(source)
    if fmt == "jsonl":
        lines = [number for number, _ in json_lines(text)]
    else:
        try:
            lines = [start for start, _ in _csv_records(text, fmt)][1:]  # after the header
        except csv.Error:
            return None
    return ("line(s)", [str(line) for line in lines]) if len(lines) == rows else None


def select_columns(frame: pd.DataFrame, cfg: DataConfig, source: Path, fmt: str = "csv") -> pd.DataFrame:
    """Map the user's columns onto text/label/domain; reject what cannot be trained on."""
    wanted = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    if cfg.domain_column:
        wanted["data.domain_column"] = cfg.domain_column
    for key, column in wanted.items():
        if column not in frame.columns:
            raise PipelineError(f"{source}: column {column!r} (from {key}) not found; "
                                f"columns are {list(map(str, frame.columns))}")
    if frame.empty:
        raise PipelineError(f"{source} has no data rows")
    out = pd.DataFrame({
        "text": frame[cfg.text_column],
        "label": frame[cfg.label_column],
        "domain": frame[cfg.domain_column] if cfg.domain_column else "all",
    }).reset_index(drop=True)
    for column, key in (("text", "data.text_column"), ("label", "data.label_column")):
        missing = blank(out[column])
        if column == "label" and cfg.empty_labels == "unlabeled":
            out.loc[missing, "label"] = None  # unlabelled text: preprocess sets it apart for self-training
            continue
        if missing.any():
            keep = " (or set data.empty_labels: unlabeled to keep them as unlabelled text)" if column == "label" else ""
            where = bad_rows(missing, row_places(source, fmt, len(out)))
            raise PipelineError(f"{source}: column {wanted[key]!r} is empty or null in {where}; "
                                f"fill or drop those rows{keep}")
    out["domain"] = out["domain"].fillna("unknown").astype(str)
    return out


def _label_text(value: object) -> str | None:
    if pd.api.types.is_scalar(value) and pd.isna(value):  # None, NaN, pd.NA (nullable Parquet columns)
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["text"] = out["text"].astype(str).map(normalise_text)
    out["label"] = out["label"].map(_label_text)
    return out[COLUMNS]


def check_classes(frame: pd.DataFrame, source: Path, label_column: str) -> None:
    classes = frame["label"].dropna().unique()
    if len(classes) < 2:
        raise PipelineError(f"{source}: column {label_column!r} has a single class {list(classes)}; "
                            "a classifier needs at least two")
    spellings = pd.Series(classes).groupby(pd.Series(classes).str.casefold()).unique()
    alike = [sorted(group) for group in spellings if len(group) > 1]
    if alike:
        log.warning("ingest: %s: labels that differ only in case are different classes: %s", source, alike[:5])


def data_report(frame: pd.DataFrame, source: Path) -> dict:
    lengths = frame["text"].str.len()
    words = frame["text"].str.split().str.len()
    return {
        "source": str(source),
        "rows": len(frame),
        "classes": int(frame["label"].nunique()),
        "unlabeled_rows": int(frame["label"].isna().sum()),
        "label_counts": {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()},
        "domain_counts": {str(k): int(v) for k, v in frame["domain"].value_counts().sort_index().items()},
        "duplicate_texts": int(frame["text"].duplicated().sum()),
        "chars": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                  "p95": int(lengths.quantile(0.95)), "max": int(lengths.max())},
        "words": {"min": int(words.min()), "mean": round(float(words.mean()), 1),
                  "p95": int(words.quantile(0.95)), "max": int(words.max())},
    }


def ingest(cfg: DataConfig) -> pd.DataFrame:
    """Read, validate and normalise the configured source into text/label/domain rows."""
    source = cfg.source
    if not source.exists():
        hint = " (run `python -m stages.fetch_default` first)" if source.name.startswith("vaderSentiment") else ""
        raise PipelineError(f"data.source {str(source)!r} does not exist{hint}")
    fmt = detect_format(source, cfg.format)
    if fmt == "vader":
        frame = read_vader(source, cfg.vader_neutral_band)
    else:
        raw = read_folder(source) if fmt == "folder" else read_table(source, fmt)
        if fmt == "folder":
            raw = raw.rename(columns={"text": cfg.text_column, "label": cfg.label_column})
            cfg = cfg.model_copy(update={"domain_column": None})
        frame = select_columns(raw, cfg, source, fmt)
    frame = normalise(frame)
    check_classes(frame, source, cfg.label_column)
    return frame


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.raw, params.paths.data_report)
    frame = ingest(params.data)
    report = data_report(frame, params.data.source)
    write_parquet(frame, params.paths.raw)
    write_json(report, params.paths.data_report)
    log.info("ingest: %d rows, labels %s, domains %s", report["rows"], report["label_counts"], report["domain_counts"])


if __name__ == "__main__":
    run_main(main)
