"""deploy: the real scoring server, a smoke test over HTTP, and the alias rollback when it fails."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import psutil
import pytest
import requests
from mlflow import MlflowClient

from stages import deploy as deploy_stage
from stages.config import load_params
from stages.deploy import smoke_test
from stages.errors import RetryableError
from stages.io import read_json
from stages.service import background_service, free_port, stop
from tests.conftest import ROOT, project_env, registry_client, run, set_param


def test_smoke_test_rejects_a_server_that_does_not_answer() -> None:
    with pytest.raises(requests.RequestException):
        smoke_test(f"http://127.0.0.1:{free_port()}", ["a text"])


def test_deploy_record_of_a_good_run(pipeline_project: Path) -> None:
    record = read_json(pipeline_project / "reports/deployment.json")
    assert record["status"] == "ok" and record["model_uri"].endswith("@champion")
    assert len(record["smoke"]["predictions"]) == 2 and record["smoke"]["latency_ms"] > 0


def _champion(root: Path) -> tuple[MlflowClient, str]:
    """The project's candidate, registered as version 1 and promoted to @champion by the empty registry."""
    registry = read_json(root / "reports/registry.json")
    assert registry["decision"] == "promoted" and str(registry["version"]) == "1"
    return registry_client(f"sqlite:///{root / 'mlflow.db'}"), registry["model_name"]


@pytest.mark.parametrize("broken", ["MLmodel", "code/stages/texts.py"])
def test_a_model_that_cannot_load_rolls_the_champion_back(registered: Path, broken: str) -> None:
    """Its MLmodel is gone, or a module of the code that ships with it is broken: the server fails, and so does the
    check in a fresh Python (which runs the shipped code, not this checkout's, where texts.py is fine). (A shipped
    module deleted outright would be filled in from this checkout by the editable install of this venv.)"""
    root = registered
    client, name = _champion(root)
    registered_model = Path(unquote(urlparse(client.get_model_version_download_uri(name, "1")).path))
    assert registered_model.is_relative_to(root)  # this test's own copy, never the shared project's
    if broken == "MLmodel":
        (registered_model / broken).unlink()
    else:
        (registered_model / broken).write_text("raise RuntimeError('a broken shipped module')\n")
    result = run([sys.executable, "-m", "stages.deploy"], root, check=False)
    assert result.returncode == 2 and "version 1, promoted by this run, does not serve" in result.stderr
    assert "@champion rolled back to no version" in result.stderr
    record = read_json(root / "reports/deployment.json")
    assert record["status"] == "rolled_back" and record["champion_after"] is None
    assert "loaded in a fresh process too, it fails" in record["error"]
    assert "champion" not in client.get_registered_model(name).aliases
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert "deploy.rolled_back" in client.get_model_version(name, "1").tags


def test_a_reused_registration_is_never_rolled_back(registered: Path) -> None:
    """A fresh clone or a nightly run reuses the version it promoted long ago: a failure to serve it here is
    reported, but says nothing against that version, so @champion stays."""
    root = registered
    client, name = _champion(root)
    run([sys.executable, "-m", "stages.register"], root)
    assert read_json(root / "reports/registry.json")["reused"]
    registered_model = Path(unquote(urlparse(client.get_model_version_download_uri(name, "1")).path))
    assert registered_model.is_relative_to(root)  # this test's own copy, never the shared project's
    (registered_model / "MLmodel").unlink()
    result = run([sys.executable, "-m", "stages.deploy"], root, check=False)
    assert result.returncode == 2
    record = read_json(root / "reports/deployment.json")
    assert record["status"] == "failed" and str(record["champion_after"]) == "1"
    assert "deploy.rolled_back" not in client.get_model_version(name, "1").tags


def test_a_server_that_fails_around_a_healthy_model_keeps_the_champion(registered: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server exits before it loads anything (here: as a shell does when uvicorn is not on PATH, 127); the
    model loads and answers in deploy's process, so the environment is to blame and the alias stays."""
    client, name = _champion(registered)
    monkeypatch.chdir(registered)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registered / 'mlflow.db'}")
    monkeypatch.setattr(deploy_stage, "serve_command", lambda *_: [sys.executable, "-c", "raise SystemExit(127)"])
    record = deploy_stage.deploy(load_params().deploy, read_json(registered / "reports/registry.json"))
    assert record["status"] == "unavailable" and "the model loads and answers in a fresh process" in record["error"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert "deploy.rolled_back" not in client.get_model_version(name, "1").tags


def test_deploy_finds_the_server_without_an_activated_environment(registered: Path) -> None:
    env = {k: v for k, v in project_env(registered).items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "stages.deploy"], cwd=registered, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(registered / "reports/deployment.json")["status"] == "ok"


def _assert_unavailable_keeps_champion(root: Path, client: MlflowClient, name: str, why: str) -> None:
    result = run([sys.executable, "-m", "stages.deploy"], root, check=False)
    assert result.returncode == 1 and "left as champion" in result.stderr and why in result.stderr
    record = read_json(root / "reports/deployment.json")
    assert record["status"] == "unavailable" and str(record["champion_after"]) == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert "deploy.rolled_back" not in client.get_model_version(name, "1").tags


def test_a_server_slow_to_start_is_retryable_and_keeps_the_champion(registered: Path) -> None:
    client, name = _champion(registered)
    set_param(registered, "deploy", "startup_timeout_s", 0.001)  # the real server cannot answer in time
    _assert_unavailable_keeps_champion(registered, client, name, "did not answer")


def test_a_port_in_use_is_retryable_and_keeps_the_champion(registered: Path) -> None:
    client, name = _champion(registered)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        set_param(registered, "deploy", "port", taken.getsockname()[1])
        _assert_unavailable_keeps_champion(registered, client, name, "already in use")


def test_a_server_that_finds_its_port_taken_is_retryable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        with pytest.raises(RetryableError, match="exited with 1 before answering"), \
                background_service("http.server", server, f"http://127.0.0.1:{port}/", timeout_s=60):
            pass


SERVER_OWNER = """
import sys, time
from stages.service import background_service
port = sys.argv[1]
server = [sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"]
with background_service("http.server", server, f"http://127.0.0.1:{port}/", timeout_s=60):
    print("serving", flush=True)
    time.sleep(600)
"""


def test_a_server_goes_when_its_owner_is_killed() -> None:
    """SIGKILL gives deploy no chance to stop the server it started: the guard around the server does."""
    port = str(free_port())
    owner = subprocess.Popen([sys.executable, "-c", SERVER_OWNER, port], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdout.readline().strip() == "serving"
    servers = [p for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [])[-3:] == [port, "--bind", "127.0.0.1"]]
    assert len(servers) == 2  # the guard and the server itself
    owner.kill()
    owner.wait(timeout=10)
    _, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "the server outlived the process that started it"


def test_a_second_interruption_while_stopping_kills_the_group_at_once() -> None:
    """A stage that ignores SIGTERM, and a second Ctrl-C during the 20 s grace: nothing is left running."""
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
                   "time.sleep(600)"
    process = subprocess.Popen([sys.executable, "-c", ignores_term], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "up"

    def second_ctrl_c(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, second_ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            stop(process)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 15  # not the 20 s grace
