"""`mlflow models serve` on the registry's @champion answers the README's request."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from stages.io import read_json
from tests.conftest import project_env, run

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_serves_the_champion(pipeline_project: Path, tmp_path: Path) -> None:
    name = read_json(pipeline_project / "reports/registry.json")["model_name"]
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=pipeline_project, env=project_env(pipeline_project), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        body = {"dataframe_split": {"columns": ["text"], "data": [["a great film"], ["a tedious, awful film"]]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).json()["predictions"]
        assert [row["label"] for row in answer] == ["positive", "negative"]
        assert abs(answer[0]["prob_positive"] + answer[0]["prob_negative"] - 1) < 1e-4
        bad = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_split": {
            "columns": ["review"], "data": [["x"]]}}, timeout=60)
        assert bad.status_code >= 400
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


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
