"""`mlflow models serve` on the registry's @champion answers the README's request."""

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
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["review"], "data": [["x"]]}},
                            timeout=60)
        assert bad.status_code >= 400
        empty = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["text"],
                                                                             "data": [["a fine film"], ["  "]]}},
                              timeout=60)
        assert empty.status_code == 400 and "column 'text' is empty or null in row(s) (0-based) 1 of 2" in empty.text
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
