"""deploy: serve `@champion` with MLflow's scoring server on loopback, smoke-test it, roll back on failure.

Only the model's own failures roll `@champion` back: a server that exits while loading it or answers wrongly, when
the version, downloaded and loaded in a fresh Python, fails too. A server that fails while the model loads and
answers there, a server still starting after `deploy.startup_timeout_s`, or a `deploy.port` already taken, leaves the aliases alone
and exits 1, so the stage is retried (Prefect) or rerun (`dvc repro`) against the same champion."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from stages.config import DeployConfig, load_params
from stages.errors import PipelineError, RetryableError
from stages.io import log, read_json, remove_outputs, run_main, write_json
from stages.registry import (
    CHAMPION,
    VersionMissing,
    alias_version,
    configure_mlflow,
    download_version,
    rollback,
    tracking_uri,
)
from stages.service import background_service, free_port, port_is_free


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", "1"]


def smoke_test(url: str, texts: list[str]) -> dict:
    """POST real texts to /invocations; the answer must have one valid label and a distribution per text."""
    body = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}
    start = time.perf_counter()
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    latency_ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise PipelineError(f"POST {url}/invocations answered {response.status_code}: {response.text[:500]}")
    predictions = response.json()["predictions"]
    check_predictions(predictions, texts)
    return {"latency_ms": round(latency_ms, 1), "predictions": predictions}


LOAD_AND_PREDICT = """import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(model.predict(pd.DataFrame({"text": json.loads(sys.argv[2])})).to_dict(orient="records")))
"""
OUT_OF_MEMORY = ("MemoryError", "OutOfMemoryError", "DefaultCPUAllocator: can't allocate memory")


def model_fault(name: str, version: str, texts: list[str], timeout_s: float) -> str | None:
    """Why the model itself does not serve, found by downloading it and scoring `texts` in a fresh Python (so the
    code that ships with it is what runs, not this checkout's); None when it loads and answers, so a server that
    failed around it failed for another reason (its environment) and the alias stays. A registry or artifact store
    that does not answer, or a check killed for time or memory, is RetryableError: nothing is known against the
    model then either."""
    model_uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as folder:
        try:
            files = download_version(name, version, Path(folder))
        except VersionMissing as error:
            return f"its files cannot be found: {error}"
        try:
            check = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(files), json.dumps(texts)],
                                   cwd=folder, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise RetryableError(f"loading {model_uri} to check it took over {timeout_s:.0f} s") from error
    if check.returncode < 0 or any(mark in check.stderr for mark in OUT_OF_MEMORY):
        raise RetryableError(f"checking {model_uri} in a fresh process ran out of memory or was killed "
                             f"(exit {check.returncode}): {check.stderr[-300:]}")
    if check.returncode != 0:
        return check.stderr.strip()[-800:]
    try:
        check_predictions(json.loads(check.stdout.strip().splitlines()[-1]), texts)
    except (PipelineError, ValueError, IndexError) as error:
        return f"it answers wrongly: {error}"
    return None


def check_predictions(predictions: list[dict], texts: list[str]) -> None:
    if len(predictions) != len(texts):
        raise PipelineError(f"sent {len(texts)} texts, got {len(predictions)} predictions")
    for row in predictions:
        labels = [key.removeprefix("prob_") for key in row if key.startswith("prob_")]
        probabilities = [row[f"prob_{label}"] for label in labels]
        finite = all(isinstance(p, int | float) and math.isfinite(p) for p in probabilities)
        if len(labels) < 2 or row.get("label") not in labels or not finite or \
                not math.isclose(sum(probabilities), 1.0, abs_tol=1e-3):
            raise PipelineError(f"invalid prediction {row}: needs a label among its prob_<label> columns, "
                                "and probabilities summing to 1")


def deploy(cfg: DeployConfig, registry: dict) -> dict:
    client = configure_mlflow()
    name = registry["model_name"]
    champion = alias_version(client, name, CHAMPION)
    record: dict = {"model_name": name, "champion": champion, "checked_at": datetime.now(UTC).isoformat()}
    if champion is None:
        return record | {"status": "no_champion", "detail": "no version holds @champion yet; nothing to serve"}
    uri = f"models:/{name}@{CHAMPION}"
    port = cfg.port or free_port(cfg.host)
    if not port_is_free(cfg.host, port):
        return record | {"status": "unavailable", "error": f"deploy.port {port} on {cfg.host} is already in use; "
                         "free it or set deploy.port: 0 for any free port", "champion_after": champion}
    try:
        # the server's own executables (uvicorn) come from this Python's environment, activated or not
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri(), "HF_HUB_OFFLINE": "1", "PATH": path}
        url = f"http://{cfg.host}:{port}"
        with background_service("mlflow models serve", serve_command(uri, cfg.host, port), f"{url}/ping",
                                timeout_s=cfg.startup_timeout_s, env=env):
            smoke = smoke_test(url, cfg.smoke_texts)
    except RetryableError as error:
        return record | {"status": "unavailable", "error": str(error)[-2000:], "champion_after": champion}
    except (PipelineError, requests.RequestException, KeyError, ValueError) as error:
        try:
            fault = model_fault(name, champion, cfg.smoke_texts, cfg.startup_timeout_s)
        except RetryableError as trouble:
            return record | {"status": "unavailable", "champion_after": champion,
                             "error": f"the server failed ({str(error)[-1500:]}); {trouble}"}
        if fault is None:
            return record | {"status": "unavailable", "champion_after": champion, "error": (
                f"the server failed ({str(error)[-1500:]}), but the model loads and answers in a fresh process: "
                "not the model's fault, so @champion stays")}
        error = PipelineError(f"{str(error)[-1500:]}; loaded in a fresh process too, it fails: {fault[-500:]}")
        # a reused record's promotion is history: a failure here says nothing against that version
        promoted_now = (registry["decision"] == "promoted" and registry["version"] == champion
                        and (not registry.get("reused") or "regated_against" in registry)
                        and alias_version(client, name, CHAMPION) == champion)  # no other run moved it meanwhile
        if promoted_now:
            rollback(client, name, champion, registry.get("previous_champion"), str(error))
        return record | {"status": "rolled_back" if promoted_now else "failed", "error": str(error)[-2000:],
                         "champion_after": alias_version(client, name, CHAMPION)}
    command = "python " + " ".join(serve_command(uri, cfg.host, 5000)[1:])
    return record | {"status": "ok", "model_uri": uri, "smoke": smoke, "serve_command": command}


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.deployment)
    registry = read_json(params.paths.registry)
    record = deploy(params.deploy, registry)
    write_json(record, params.paths.deployment)
    log.info("deploy: %s (champion %s)", record["status"], record["champion"])
    if record["status"] == "unavailable":
        raise RetryableError(f"deploy: could not serve {record['model_name']}@champion (version {record['champion']}, "
                             f"left as champion): {record['error'][:500]}; see {params.paths.deployment}")
    if record["status"] == "rolled_back":
        raise PipelineError(f"deploy: {record['model_name']} version {record['champion']}, promoted by this run, does "
                            f"not serve: @champion rolled back to {record['champion_after'] or 'no version'}; see "
                            f"{params.paths.deployment}")
    if record["status"] == "failed":
        raise PipelineError(f"deploy: smoke test of {record['model_name']}@champion (version {record['champion']}) "
                            f"failed; the alias stays; see {params.paths.deployment}")


if __name__ == "__main__":
    run_main(main)
