"""`mlflow models serve` on the registry's @champion answers the README's request."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests

from stages.io import read_json
from stages.service import background_service, free_port
from tests.conftest import project_env, run

pytestmark = pytest.mark.e2e


def test_mlflow_serves_the_champion(pipeline_project: Path) -> None:
    name = read_json(pipeline_project / "reports/registry.json")["model_name"]
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with background_service("mlflow models serve", cmd, f"{url}/ping", timeout_s=120,
                            env=project_env(pipeline_project), cwd=str(pipeline_project)):
        body = {"dataframe_split": {"columns": ["text"], "data": [["a great film"], ["a tedious, awful film"]]}}
        answer = requests.post(f"{url}/invocations", json=body, timeout=60).json()["predictions"]
        assert [row["label"] for row in answer] == ["positive", "negative"]
        assert abs(answer[0]["prob_positive"] + answer[0]["prob_negative"] - 1) < 1e-4
        # a request gets ingest's normalisation (HTML entities, NFC, spaces), as the training text did
        raw = {"dataframe_split": {"columns": ["text"], "data": [["  a&#32;great \u00a0 film&period; "]]}}
        same = requests.post(f"{url}/invocations", json=raw, timeout=60).json()["predictions"][0]
        clean = {"dataframe_split": {"columns": ["text"], "data": [["a great film."]]}}
        assert same == requests.post(f"{url}/invocations", json=clean, timeout=60).json()["predictions"][0]
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["review"], "data": [["x"]]}},
                            timeout=60)
        assert bad.status_code >= 400
        empty = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["text"],
                                                                             "data": [["a fine film"], ["  "]]}},
                              timeout=60)
        assert empty.status_code == 400 and "column 'text' is empty or null in row(s) (0-based) 1 of 2" in empty.text
        invisible = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["text"], "data": [
            ["a fine film"], ["\u200b\u200d"]]}}, timeout=60)  # zero-width characters only: no text to score
        assert invisible.status_code == 400 and "empty or null in row(s) (0-based) 1 of 2" in invisible.text
        none = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["text"], "data": []}},
                             timeout=60)
        assert none.status_code == 200 and none.json()["predictions"] == []


def test_batch_prediction_scores_a_file(pipeline_project: Path, tmp_path: Path) -> None:
    source = tmp_path / "texts.csv"
    pd.DataFrame({"review": ["a wonderful, moving and beautiful film", "an awful, boring, terrible film"]}).to_csv(
        source, index=False)
    out = tmp_path / "scored.csv"
    run([sys.executable, "-m", "stages.batch_predict", "--input", str(source), "--text-column", "review",
         "--output", str(out)], pipeline_project)
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["review", "label", "prob_negative", "prob_positive"]
    assert scored["label"].tolist() == ["positive", "negative"]


def test_batch_prediction_refuses_rows_without_text(pipeline_project: Path, tmp_path: Path) -> None:
    source = tmp_path / "texts.csv"
    source.write_text("review\na wonderful film\n\"  \"\nan awful film\n\"\"\n")
    out = tmp_path / "scored.csv"
    result = run([sys.executable, "-m", "stages.batch_predict", "--input", str(source), "--text-column", "review",
                  "--output", str(out)], pipeline_project, check=False)
    assert result.returncode == 2
    assert f"{source}: column 'review' is empty or null in line(s) 3, 5" in result.stderr
    assert not out.exists()


def _batch(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.batch_predict", *args], root, check=False)


def test_batch_prediction_refuses_what_it_cannot_score_before_scoring(pipeline_project: Path, tmp_path: Path) -> None:
    source = tmp_path / "texts.jsonl"
    source.write_text('{"text": "a fine film", "label": "positive", "predicted_label": "x"}\n')
    cases = {  # the arguments, and the start of the one-line error (exit 2)
        ("--input", str(tmp_path), "--output", str(tmp_path / "o.csv")): f"--input {tmp_path} is a folder",
        ("--input", str(source), "--output", str(tmp_path / "o.xlsx")): f"--output {tmp_path / 'o.xlsx'}: write",
        ("--input", str(source), "--output", str(source)): f"--output {source} is the input file",
        ("--input", str(source), "--output", str(tmp_path / "o.csv"), "--model-uri", "models:/nope@champion"):
            "--model-uri models:/nope@champion: ",
        ("--input", str(source), "--output", str(tmp_path / "o.csv")):
            f"{source}: has columns ['predicted_label'] as well as ['label']",
    }
    for args, message in cases.items():
        result = _batch(pipeline_project, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": "a fine film"}\n{"text": 12}\n')
    result = _batch(pipeline_project, "--input", str(numbers), "--output", str(tmp_path / "o.csv"))
    assert result.returncode == 2 and "holds values that are not text (numbers, lists) in line(s) 2" in result.stderr
    env = {k: v for k, v in project_env(pipeline_project).items() if k != "MLFLOW_TRACKING_URI"}
    elsewhere = subprocess.run([sys.executable, "-m", "stages.batch_predict", "--input", str(source), "--output",
                                str(tmp_path / "o.csv")], check=False, cwd=tmp_path, env=env, capture_output=True,
                               text=True)
    assert elsewhere.returncode == 2 and "run from the project root" in elsewhere.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o.csv").exists()
