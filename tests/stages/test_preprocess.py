import pandas as pd
import pytest
from pydantic import ValidationError

from stages.config import PreprocessConfig
from stages.errors import PipelineError
from stages.preprocess import UNLABELED, check_leakage, preprocess, text_key
from tests.conftest import repo_cfg


def test_splits_are_stratified_and_domains_held_out(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    splits, mapping = tiny_splits
    assert mapping == {"negative": 0, "positive": 1}
    in_domain = splits[splits["split"] != "heldout"]
    assert set(in_domain["domain"]) == {"movie"}
    assert set(splits.loc[splits["split"] == "heldout", "domain"]) == {"amazon", "tweets", "nyt"}
    for name, group in in_domain.groupby("split"):
        share = (group["label"] == "positive").mean()
        assert 0.4 <= share <= 0.6, name
    assert abs((in_domain["split"] == "test").mean() - 0.25) < 0.02


def test_no_text_in_two_splits(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    splits = tiny_splits[0]
    assert splits.assign(k=text_key(splits["text"])).groupby("k")["split"].nunique().max() == 1


def test_seeded_split_is_repeatable(tiny_frame: pd.DataFrame) -> None:
    cfg = repo_cfg("preprocess", train_domains=["movie"], seed=3)
    first, _, _ = preprocess(tiny_frame, cfg)
    second, _, _ = preprocess(tiny_frame, cfg)
    pd.testing.assert_frame_equal(first, second)


def test_duplicates_collapse_before_splitting(tiny_frame: pd.DataFrame) -> None:
    doubled = pd.concat([tiny_frame, tiny_frame.assign(text=tiny_frame["text"].str.upper())])
    splits, _, _ = preprocess(doubled, repo_cfg("preprocess", train_domains=["movie"]))
    assert len(splits) == len(tiny_frame)


def test_few_shot_subsampling(tiny_frame: pd.DataFrame) -> None:
    splits, _, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"], n_per_class=8))
    assert splits[splits["split"] == "train"]["label"].value_counts().to_dict() == {"negative": 8, "positive": 8}


def test_keep_unlabeled_keeps_the_rows_few_shot_left_out(tiny_frame: pd.DataFrame) -> None:
    few, _, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"], n_per_class=8))
    kept, _, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"], n_per_class=8,
                                              keep_unlabeled=True))
    every, _, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"]))
    pd.testing.assert_frame_equal(kept[kept["split"] != UNLABELED].reset_index(drop=True), few)  # labelled: as before
    unlabeled, train = set(kept.loc[kept["split"] == UNLABELED, "text"]), set(kept.loc[kept["split"] == "train", "text"])
    assert unlabeled and not unlabeled & train
    assert (kept.loc[kept["split"] == UNLABELED, "label_id"] == -1).all()  # text only
    assert unlabeled | train == set(every.loc[every["split"] == "train", "text"])


def test_unlabelled_source_rows_become_text_only_rows_of_their_domain(tiny_frame: pd.DataFrame) -> None:
    movie = tiny_frame[tiny_frame["domain"] == "movie"]
    extra = pd.DataFrame({"text": ["an unlabelled movie line", "another one, no label", "held-out text, no label",
                                   "a domain with no labelled row", movie["text"].iloc[0]],  # labelled again: it stays
                          "label": None, "domain": ["movie", "movie", "nyt", "blogs", "movie"]})
    splits, _, _ = preprocess(pd.concat([extra, tiny_frame], ignore_index=True),
                           repo_cfg("preprocess", train_domains=["movie"]))
    plain, _, _ = preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["movie"]))
    unlabeled = splits[splits["split"] == UNLABELED]
    assert sorted(zip(unlabeled["domain"], unlabeled["text"])) == [
        ("movie", "an unlabelled movie line"), ("movie", "another one, no label"), ("nyt", "held-out text, no label")]
    assert (unlabeled["label_id"] == -1).all() and unlabeled["label"].isna().all()
    pd.testing.assert_frame_equal(splits[splits["split"] != UNLABELED].reset_index(drop=True), plain)


def test_keep_unlabeled_without_few_shot_is_rejected() -> None:
    section = repo_cfg("preprocess").model_dump() | {"keep_unlabeled": True}
    with pytest.raises(ValidationError, match="keep_unlabeled keeps the training rows that preprocess.n_per_class leaves out"):
        PreprocessConfig.model_validate(section)


def test_unknown_training_domain_is_named(tiny_frame: pd.DataFrame) -> None:
    with pytest.raises(PipelineError, match=r"preprocess.train_domains names \['films'\]"):
        preprocess(tiny_frame, repo_cfg("preprocess", train_domains=["films"]))
    single = tiny_frame.assign(domain="all")  # data without a domain column (data.domain_column: null)
    with pytest.raises(PipelineError, match=r"domains are \['all'\]; set preprocess.train_domains: null"):
        preprocess(single, repo_cfg("preprocess", train_domains=["movie"]))


def test_label_unseen_in_training_is_rejected(tiny_frame: pd.DataFrame) -> None:
    odd = tiny_frame.copy()
    odd.loc[odd["domain"] == "nyt", "label"] = "neutral"
    with pytest.raises(PipelineError, match=r"labels \['neutral'\] never occur in the training split"):
        preprocess(odd, repo_cfg("preprocess", train_domains=["movie"]))


def test_leakage_check_catches_shared_text() -> None:
    leaky = pd.DataFrame({"text": ["Same  text", "same text"], "split": ["train", "test"]})
    with pytest.raises(PipelineError, match="more than one split"):
        check_leakage(leaky)


def test_too_small_to_stratify(tiny_frame: pd.DataFrame) -> None:
    with pytest.raises(PipelineError, match="too few rows"):
        preprocess(tiny_frame.head(3), repo_cfg("preprocess", train_domains=None))


def test_an_id_column_as_label_gets_a_short_error_that_says_so(tiny_frame: pd.DataFrame) -> None:
    frame = tiny_frame.assign(label=[f"row {i}: " + "a long text picked as the label by mistake " * 20
                                     for i in range(len(tiny_frame))])
    with pytest.raises(PipelineError, match=r"too few rows .*\(\d+ labels in \d+ rows, the rarest .* is "
                                            r"data.label_column an id or text column\?\)") as error:
        preprocess(frame, repo_cfg("preprocess", train_domains=None))
    assert len(str(error.value)) < 600


def test_too_few_rows_with_integer_labels_names_them(tiny_frame: pd.DataFrame) -> None:
    frame = tiny_frame.head(3).assign(label=pd.array([1, 2, 2], dtype="Int64"))
    with pytest.raises(PipelineError, match=r"label counts \{'2': 2, '1': 1\}"):
        preprocess(frame, repo_cfg("preprocess", train_domains=None))


@pytest.mark.parametrize("rare_rows", [2, 3])
def test_a_class_too_small_for_every_split_is_named(tiny_frame: pd.DataFrame, rare_rows: int) -> None:
    frame = tiny_frame.copy()
    frame.loc[frame.index[:rare_rows], "label"] = "sports"
    with pytest.raises(PipelineError, match=r"1 class\(es\) too small to occur in train, val and test: rows per "
                                            r"split \{'sports': \{'train': \d, 'val': \d, 'test': \d\}\}"):
        preprocess(frame, repo_cfg("preprocess", train_domains=None))


def test_repeats_with_different_labels_are_reported(tiny_frame: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    frame = pd.concat([tiny_frame, tiny_frame.head(4).assign(label="other")], ignore_index=True)
    with caplog.at_level("INFO", logger="stages"):
        splits, _, report = preprocess(frame, repo_cfg("preprocess", train_domains=None))
    assert "0 text(s) shorter than preprocess.min_chars and 4 repeat(s) dropped" in caplog.text
    assert "4 repeated text(s) carry different labels; each keeps its first row's label" in caplog.text
    assert len(splits) == len(tiny_frame) and (splits["label"] != "other").all()
    assert report["rows_read"] == len(frame)
    assert report["dropped"] == {"shorter_than_min_chars": 0, "repeats": 4, "unlabelled_in_domains_without_labels": 0}
    assert report["repeats_with_different_labels"]["texts"] == 4
    assert "other" in report["repeats_with_different_labels"]["example"]["labels"]
    counted = {(name, domain): n for name, per_domain in report["rows"].items() for domain, n in per_domain.items()}
    assert counted == splits.groupby(["split", "domain"]).size().to_dict()
