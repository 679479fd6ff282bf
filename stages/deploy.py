"""deploy: serve `@champion` with MLflow's scoring server on loopback, smoke-test it, roll back on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import requests

from stages.config import DeployConfig, load_params
from stages.errors import PipelineError
from stages.io import log, read_json, remove_outputs, run_main, write_json
from stages.registry import CHAMPION, alias_version, configure_mlflow, rollback, tracking_uri


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", "1"]


@contextmanager
def scoring_server(model_uri: str, host: str, port: int, timeout_s: float) -> Iterator[str]:
    """Run `mlflow models serve` until the block ends; yield its base URL once /ping answers."""
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri(), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile(mode="w+") as logfile:
        process = subprocess.Popen(serve_command(model_uri, host, port), env=env, stdout=logfile,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{host}:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    logfile.seek(0)
                    raise PipelineError(f"mlflow models serve exited with {process.returncode}:\n{logfile.read()[-3000:]}")
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    logfile.seek(0)
                    raise PipelineError(f"{url} did not answer /ping within deploy.startup_timeout_s="
                                        f"{timeout_s}:\n{logfile.read()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def smoke_test(url: str, texts: list[str], labels: list[str]) -> dict:
    """POST real texts to /invocations; the answer must have one valid label and a distribution per text."""
    body = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}
    start = time.perf_counter()
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    latency_ms = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise PipelineError(f"POST {url}/invocations answered {response.status_code}: {response.text[:500]}")
    predictions = response.json()["predictions"]
    if len(predictions) != len(texts):
        raise PipelineError(f"sent {len(texts)} texts, got {len(predictions)} predictions")
    for row in predictions:
        total = sum(row[f"prob_{label}"] for label in labels)
        if row["label"] not in labels or abs(total - 1.0) > 1e-3:
            raise PipelineError(f"invalid prediction {row}: label must be one of {labels}, probabilities sum to 1")
    return {"latency_ms": round(latency_ms, 1), "predictions": predictions}


def deploy(cfg: DeployConfig, registry: dict, labels: list[str]) -> dict:
    client = configure_mlflow()
    name = registry["model_name"]
    champion = alias_version(client, name, CHAMPION)
    record: dict = {"model_name": name, "champion": champion, "checked_at": datetime.now(timezone.utc).isoformat()}
    if champion is None:
        return record | {"status": "no_champion", "detail": "no version holds @champion yet; nothing to serve"}
    uri = f"models:/{name}@{CHAMPION}"
    port = cfg.port or free_port(cfg.host)
    try:
        with scoring_server(uri, cfg.host, port, cfg.startup_timeout_s) as url:
            smoke = smoke_test(url, cfg.smoke_texts, labels)
    except (PipelineError, requests.RequestException, KeyError, ValueError) as error:
        promoted_now = registry["decision"] == "promoted" and registry["version"] == champion
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
    record = deploy(params.deploy, registry, read_json(params.paths.label_map)["labels"])
    write_json(record, params.paths.deployment)
    log.info("deploy: %s (champion %s)", record["status"], record["champion"])
    if record["status"] in {"failed", "rolled_back"}:
        raise PipelineError(f"deploy: smoke test of {record['model_name']}@champion failed, status "
                            f"{record['status']}; see {params.paths.deployment}")


if __name__ == "__main__":
    run_main(main)
