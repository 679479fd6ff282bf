import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages.config import DataConfig
from stages.errors import PipelineError
from stages.ingest import data_report, ingest
from stages.texts import blank
from tests.conftest import REPO_PARAMS, ROOT, TINY_CSV, make_project, project_env, repo_cfg


def _cfg(source: Path, **kw: object) -> DataConfig:
    return repo_cfg("data", **({"source": source, "format": "auto", "text_column": "text", "label_column": "label",
                                "domain_column": None} | kw))


def test_reads_csv_with_domains(tiny_frame: pd.DataFrame) -> None:
    assert list(tiny_frame.columns) == ["text", "label", "domain"]
    assert set(tiny_frame["domain"]) == {"movie", "amazon", "tweets", "nyt"}
    assert set(tiny_frame["label"]) == {"negative", "positive"}


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_other_formats_and_column_names(tmp_path: Path, fmt: str) -> None:
    frame = pd.read_csv(TINY_CSV).rename(columns={"text": "review", "label": "stars"}).head(40)
    frame["stars"] = (frame["stars"] == "positive").astype(int) + 1  # integer labels 1/2
    path = tmp_path / f"data.{fmt}"
    {"tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    out = ingest(_cfg(path, text_column="review", label_column="stars"))
    assert len(out) == 40 and set(out["label"]) == {"1", "2"} and set(out["domain"]) == {"all"}


def test_folder_of_text_files(tmp_path: Path) -> None:
    for label, texts in {"pos": ["a lovely film", "great fun"], "neg": ["awful", "a bore"]}.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "data" / label / f"{i}.txt").write_text(text)
    out = ingest(_cfg(tmp_path / "data"))
    assert sorted(out["label"]) == ["neg", "neg", "pos", "pos"]


def test_a_folder_source_reads_upper_case_suffixes_and_names_an_empty_class(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    for label, name in {"pos": "A.TXT", "neg": "b.txt", "neutral": "notes.md"}.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / name).write_text(f"a {label} text")
    with caplog.at_level("WARNING", logger="stages"):
        out = ingest(_cfg(tmp_path / "data"))
    assert sorted(out["label"]) == ["neg", "pos"]
    assert "class folder(s) ['neutral'] of" in caplog.text and "hold no .txt file" in caplog.text


def test_normalises_html_entities_and_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,label\r\n"fish &amp; chips\r\nrock",a\r\nplain,b\r\n')
    assert ingest(_cfg(path))["text"].tolist() == ["fish & chips\nrock", "plain"]


def test_builtin_default_has_four_domains() -> None:
    source = ROOT / REPO_PARAMS.data.source
    if not source.exists():
        pytest.skip("default data not fetched: run `python -m stages.fetch_default`")
    frame = ingest(repo_cfg("data", source=source))
    report = data_report(frame, source)
    assert report["domain_counts"] == {"amazon": 3610, "movie": 10568, "nyt": 4946, "tweets": 4196}
    assert not frame["text"].str.contains("&amp;|\r", regex=True).any()


@pytest.mark.parametrize(("content", "kw", "message"), [
    (b"", {}, "is empty"),
    (b"body,label\nhi,a\nyo,b\n", {}, r"column 'text' \(from data.text_column\) not found"),
    (b"text,label\nhi,a\nyo,a\n", {}, "single class"),
    (b"text,label\nhi,a\n,b\nyo,b\n", {}, r"column 'text' is empty or null in line\(s\) 3"),
    (b"text,label\nhi,a\nyo,\n", {}, r"column 'label' is empty or null in line\(s\) 3; .*data.empty_labels"),
    (b"text,label\nhi,a\nyo \xff\xfe,b\n", {}, r"\(line 3\) is not valid UTF-8"),
    (b"text,label\nhi,a\n", {"domain_column": "site"}, r"column 'site' \(from data.domain_column\)"),
    # an unquoted comma in the first data row: pandas would take the first field as the row's index
    (b"text,label\nhi, there,a\nyo,b\n", {}, r"line 2 has more fields than the header \(2\); quote texts"),
    (b"text,label\n\"hi\nthere\",you,a\nyo,b\n", {}, r"line 2 has more fields than the header"),
    (b"text,label\nhi,a\nwell, well,b\n", {}, r"Expected 2 fields in line 3, saw 3"),
    (b"text,label\rhi, there,a\ryo,b\r", {}, r"line 2 has more fields than the header \(2\)"),  # \r line ends
    # blank lines, whitespace-only lines and quoted multi-line texts before the bad row: its line, as an editor shows
    (b"text,label\n\nhi,a\n   \n\"two\nlines\",b\n,b\nyo,a\n", {}, r"empty or null in line\(s\) 7;"),
    (b"text,label\r\n\r\n\"two\r\nlines\",b\r\nyo,\r\nhi,a\r\n", {}, r"'label' is empty or null in line\(s\) 5;"),
    (b"text,label\nhi,a\n\"  \",b\n\n\"\",a\nyo,b\n", {}, r"'text' is empty or null in line\(s\) 3, 5;"),  # quoted blanks
])
def test_bad_input_names_file_and_column(tmp_path: Path, content: bytes, kw: dict, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message) as error:
        ingest(_cfg(path, **kw))
    assert str(path) in str(error.value)


def test_empty_labels_can_be_kept_as_unlabelled_text(tmp_path: Path) -> None:
    path = tmp_path / "some_unlabelled.csv"
    path.write_text("text,label\ngood film,1\nbad film,0\nno label here,\nnone either,\n")
    frame = ingest(_cfg(path, empty_labels="unlabeled"))
    assert frame["label"].iloc[:2].tolist() == ["1", "0"] and frame["label"].iloc[2:].isna().all()
    report = data_report(frame, path)
    assert report["unlabeled_rows"] == 2 and report["label_counts"] == {"0": 1, "1": 1}


def test_nullable_integer_labels_leave_unlabelled_rows_null(tmp_path: Path) -> None:
    path = tmp_path / "nullable.parquet"
    pd.DataFrame({"text": ["good film", "bad film", "no label"],
                  "label": pd.array([1, 0, None], dtype="Int64")}).to_parquet(path)
    frame = ingest(_cfg(path, empty_labels="unlabeled"))
    assert frame["label"].iloc[:2].tolist() == ["1", "0"] and frame["label"].iloc[2:].isna().all()  # not "<NA>"


def test_missing_source_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="fetch_default"):
        ingest(_cfg(tmp_path / "vaderSentiment-3.3.2.tar.gz"))


def test_stage_fails_cleanly_and_leaves_no_output(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    (root / "data" / "tiny_sentiment.csv").write_text("text,label,domain\nonly,one,movie\nclass,one,movie\n")
    stale = root / "data" / "raw" / "dataset.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    result = subprocess.run([sys.executable, "-m", "stages.ingest"], check=False, cwd=root, env=project_env(root),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "single class" in result.stderr and "Traceback" not in result.stderr
    assert not stale.exists() and not (root / "reports" / "data_report.json").exists()
    assert not list(stale.parent.glob(".*"))  # no temporary leftovers either


def test_report_counts(tiny_frame: pd.DataFrame) -> None:
    report = data_report(tiny_frame, TINY_CSV)
    assert report["rows"] == 280 and report["label_counts"] == {"negative": 140, "positive": 140}
    json.dumps(report)


def test_jsonl_null_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": null, "label": "b"}\n')
    with pytest.raises(PipelineError, match=r"line\(s\) 2"):
        ingest(_cfg(path))


def test_the_line_named_counts_blank_lines_in_jsonl_and_tsv(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "fine", "label": "a"}\n\n  \n{"text": "", "label": "b"}\n{"text": "ok", "label": "b"}\n')
    with pytest.raises(PipelineError, match=r"line\(s\) 4;"):
        ingest(_cfg(jsonl))
    tsv = tmp_path / "d.tsv"
    tsv.write_text('text\tlabel\n\n"quoted\ta\nok\tb\n \tb\n')  # no quoting in TSV: the quote is text
    with pytest.raises(PipelineError, match=r"line\(s\) 5;"):
        ingest(_cfg(tsv))


def test_parquet_rows_are_named_by_position(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["good", "bad", None], "label": ["a", "b", "a"]}).to_parquet(path)
    with pytest.raises(PipelineError, match=r"row\(s\) \(0-based, not counting a header\) 2;"):
        ingest(_cfg(path))


def test_an_empty_file_in_a_folder_source_is_named(tmp_path: Path) -> None:
    for name, text in [("pos/a.txt", "good"), ("pos/b.txt", "  "), ("neg/c.txt", "bad")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(PipelineError, match=r"empty or null in file\(s\) pos/b.txt;"):
        ingest(_cfg(tmp_path, format="folder"))


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "cut off", "lab', r"line 3 is not valid JSON \(Unterminated string starting at: column 21\)"),
    ('["a", "list"]', r"line 3 is a JSON list, not an object of columns"),
])
def test_a_broken_jsonl_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    # a raw tab and a line separator inside strings: pandas reads both, so they are not the broken line
    path.write_text('{"text": "fine\tand\u2028well", "label": "a"}\n\n' + line + '\n{"text": "ok", "label": "b"}\n')
    with pytest.raises(PipelineError, match=f"{path}: cannot parse as jsonl \\({message}"):
        ingest(_cfg(path))


def test_case_twins_and_nested_files_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ["Movie/a.txt", "movie/b.txt", "book/c.txt", "book/old/d.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}")
    with caplog.at_level("INFO", logger="stages"):
        frame = ingest(_cfg(tmp_path, format="folder"))
    assert sorted(frame["label"]) == ["Movie", "book", "movie"]
    assert "labels that differ only in case are different classes: [['Movie', 'movie']]" in caplog.text
    assert "1 .txt file(s) in folders below the class folders are not read, e.g. book/old/d.txt" in caplog.text


def test_compressed_csv_is_read(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"text,label\ngood,pos\nbad,neg\n"))
    assert ingest(_cfg(path))["label"].tolist() == ["pos", "neg"]


def test_blank_means_no_visible_text_after_normalisation() -> None:
    values = pd.Series(["ok", "  ", None, "\u200b\u200d", "\x00\x01", "&nbsp;", "&amp;nbsp;", "&#8203;",
                        "\U0001f621", "\U0001fae8", "\ue000", "\u00e9"])
    assert blank(values).tolist() == [False, True, True, True, True, True, True, True, False, False, False, False]
