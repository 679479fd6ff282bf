"""preprocess: clean, deduplicate, map labels to ids, split (stratified, seeded), hold out domains, check leakage."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from stages.config import PreprocessConfig, load_params
from stages.errors import PipelineError
from stages.io import log, remove_outputs, run_main, write_json, write_parquet

SPLITS = ("train", "val", "test")
HELDOUT = "heldout"
UNLABELED = "unlabeled"  # text only (label null, label_id -1), for self-training: the source's unlabelled rows (of
                         # a training domain: fine_tune's; of a held-out domain: adapt's), and with keep_unlabeled the
                         # training rows n_per_class left out


def text_key(texts: pd.Series) -> pd.Series:
    """The identity used for deduplication and the leakage check: case- and space-insensitive."""
    return texts.str.lower().str.split().str.join(" ")


def clean(frame: pd.DataFrame, min_chars: int) -> tuple[pd.DataFrame, dict]:
    """Drop short texts and repeats; of a text given both with and without a label, the labelled row stays. Also
    return what was dropped, for the preprocess report."""
    kept = frame[frame["text"].str.len() >= min_chars].reset_index(drop=True)
    order = kept["label"].isna().sort_values(kind="stable").index
    first = ~text_key(kept.loc[order, "text"]).duplicated().to_numpy()
    dropped = {"shorter_than_min_chars": len(frame) - len(kept), "repeats": int((~first).sum())}
    log.info("preprocess: %d text(s) shorter than preprocess.min_chars and %d repeat(s) dropped",
             dropped["shorter_than_min_chars"], dropped["repeats"])
    return kept.loc[order[first]].sort_index().reset_index(drop=True), {
        "rows_read": len(frame), "dropped": dropped, "repeats_with_different_labels": report_conflicts(kept)}


def report_conflicts(frame: pd.DataFrame) -> dict:
    """Say which repeated texts carry different labels: only the first row's label is kept."""
    labels = frame.assign(key=text_key(frame["text"])).dropna(subset=["label"]).groupby("key")["label"]
    conflicting = labels.nunique()
    conflicting = conflicting[conflicting > 1]
    if conflicting.empty:
        return {"texts": 0}
    key = conflicting.index[0]
    example = {"text": key[:200], "labels": sorted(map(str, labels.unique()[key]))}
    log.warning("preprocess: %d repeated text(s) carry different labels; each keeps its first row's label, "
                "e.g. %r labelled %s", len(conflicting), key[:80], example["labels"])
    return {"texts": len(conflicting), "example": example}


def label_map(labels: pd.Series) -> dict[str, int]:
    return {label: i for i, label in enumerate(sorted(labels.unique()))}


def partition_domains(frame: pd.DataFrame, train_domains: list[str] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if train_domains is None:
        return frame, frame.iloc[0:0]
    unknown = sorted(set(train_domains) - set(frame["domain"]))
    if unknown:
        domains = sorted(frame["domain"].unique())
        hint = ("; set preprocess.train_domains: null to train on every row (the data has no domain column: "
                "data.domain_column is null)") if domains == ["all"] else "; null trains on every domain"
        raise PipelineError(f"preprocess.train_domains names {unknown}, not in the data; domains are {domains}{hint}")
    inside = frame["domain"].isin(train_domains)
    return frame[inside], frame[~inside]


def in_domain_unlabeled(splits: pd.DataFrame) -> pd.Series:
    """Which rows are unlabelled text of a domain trained on (a held-out domain's text is the adapt study's)."""
    heldout = splits.loc[splits["split"] == HELDOUT, "domain"].drop_duplicates()
    return (splits["split"] == UNLABELED) & ~splits["domain"].isin(heldout)


def take_per_class(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most `n` random rows of each label (seeded): the few-shot draw."""
    return frame.sample(frac=1.0, random_state=seed).groupby("label").head(n)


def describe_counts(counts: pd.Series, rows: int) -> str:
    """Label counts for an error message: all of them when few, else how many and the rarest (labels cut at 40
    characters: a text column picked as the label would print whole texts)."""
    def shown(part: pd.Series) -> dict[str, int]:
        return {(str(label) if len(str(label)) <= 40 else str(label)[:37] + "..."): int(n) for label, n in part.items()}

    if len(counts) <= 10:
        return f"label counts {shown(counts)}"
    hint = "; nearly one label per row: is data.label_column an id or text column?" if len(counts) > rows / 2 else ""
    return f"{len(counts)} labels in {rows} rows, the rarest {shown(counts.tail(5))}{hint}"


def _stratified(frame: pd.DataFrame, size: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = frame["label"].value_counts()
    if counts.min() < 2 or round(size * len(frame)) < len(counts):
        raise PipelineError(f"preprocess: too few rows to split off a stratified {what} set "
                            f"({describe_counts(counts, len(frame))}); add data, or raise preprocess.{what}_size so "
                            "that it holds at least one row per class")
    return train_test_split(frame, test_size=size, random_state=seed, stratify=frame["label"])


def split(frame: pd.DataFrame, cfg: PreprocessConfig) -> pd.DataFrame:
    rest, test = _stratified(frame, cfg.test_size, cfg.seed, "test")
    train, val = _stratified(rest, cfg.val_size / (1.0 - cfg.test_size), cfg.seed, "val")
    check_every_class_in_every_split({"train": train, "val": val, "test": test})
    unlabeled = train.iloc[0:0]
    if cfg.n_per_class is not None:
        drawn = take_per_class(train, cfg.n_per_class, cfg.seed)
        unlabeled, train = (train.drop(drawn.index) if cfg.keep_unlabeled else unlabeled), drawn
    unlabeled = unlabeled.assign(label=None)  # text only from here on
    return pd.concat([train.assign(split="train"), val.assign(split="val"), test.assign(split="test"),
                      unlabeled.assign(split=UNLABELED)])


def check_every_class_in_every_split(parts: dict[str, pd.DataFrame]) -> None:
    """A class missing from val or test could not be early-stopped on or scored, yet would weigh on macro-F1 (and
    the gate on it) as a zero: the stratified split rounds a class of a few rows to none in the smaller splits."""
    counts = pd.DataFrame({name: part["label"].value_counts() for name, part in parts.items()}).fillna(0).astype(int)
    short = counts[(counts == 0).any(axis=1)]
    if not short.empty:
        rows = {str(label): {name: int(n) for name, n in row.items()} for label, row in short.head(5).iterrows()}
        raise PipelineError(f"preprocess: {len(short)} class(es) too small to occur in train, val and test: rows per "
                            f"split {rows}; add rows for them, merge them into another class, or drop them")


def check_labels(splits: pd.DataFrame) -> None:
    seen = set(splits.loc[splits["split"] == "train", "label"])
    unseen = splits[~splits["label"].isin(seen) & (splits["split"] != UNLABELED)]
    if not unseen.empty:
        where = unseen.groupby(["split", "domain"])["label"].unique().to_dict()
        raise PipelineError(f"preprocess: labels {sorted(unseen['label'].unique())} never occur in the "
                            f"training split but occur in {where}; add training rows for them or drop them")


def check_leakage(splits: pd.DataFrame) -> None:
    keys = text_key(splits["text"])
    per_text = splits.assign(key=keys).groupby("key")["split"].nunique()
    leaked = per_text[per_text > 1]
    if not leaked.empty:
        raise PipelineError(f"preprocess: {len(leaked)} text(s) occur in more than one split, "
                            f"e.g. {leaked.index[0][:80]!r}; deduplicate the source")


def preprocess(frame: pd.DataFrame, cfg: PreprocessConfig) -> tuple[pd.DataFrame, dict[str, int], dict]:
    """Return every kept row with its split (train/val/test/heldout/unlabeled) and label id, the label map, and a
    report of what was dropped and how many rows each split holds per domain."""
    cleaned, report = clean(frame, cfg.min_chars)
    no_label = cleaned["label"].isna()  # unlabelled rows of the source (data.empty_labels: unlabeled)
    in_domain, heldout = partition_domains(cleaned[~no_label], cfg.train_domains)
    if in_domain.empty:
        raise PipelineError("preprocess: no rows left after cleaning; check data.source and preprocess.min_chars")
    unlabeled = cleaned[no_label & cleaned["domain"].isin(pd.concat([in_domain["domain"], heldout["domain"]]))]
    dropped = report["dropped"]["unlabelled_in_domains_without_labels"] = int(no_label.sum()) - len(unlabeled)
    if dropped:
        log.info("preprocess: %d unlabelled rows dropped: their domains have no labelled rows to train or score on",
                 dropped)
    splits = pd.concat([split(in_domain, cfg), unlabeled.assign(split=UNLABELED), heldout.assign(split=HELDOUT)],
                       ignore_index=True)
    check_labels(splits)
    check_leakage(splits)
    mapping = label_map(splits.loc[splits["split"] == "train", "label"])
    splits["label_id"] = splits["label"].map(mapping).fillna(-1).astype("int64")  # -1: unlabelled
    splits["label"] = splits["label"].astype("str")  # null stays null; the same Parquet schema with or without
    report["rows"] = {name: {str(domain): int(n) for domain, n in part.groupby("domain").size().items()}
                      for name, part in splits.groupby("split", sort=False)}
    return splits[["text", "label", "label_id", "domain", "split"]], mapping, report


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.splits, params.paths.label_map, params.paths.preprocess_report)
    splits, mapping, report = preprocess(pd.read_parquet(params.paths.raw), params.preprocess)
    write_parquet(splits, params.paths.splits)
    write_json({"labels": list(mapping), "label_to_id": mapping}, params.paths.label_map)
    write_json(report, params.paths.preprocess_report)
    log.info("preprocess: rows per split and domain %s", report["rows"])


if __name__ == "__main__":
    run_main(main)
