"""Run a server process in the background until it answers on loopback; stop it and its children afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from stages.errors import PipelineError, RetryableError

GUARD = Path(__file__).with_name("service_guard.py")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Could a server bind `port` now? (SO_REUSEADDR, as uvicorn binds: a port in TIME_WAIT counts as free.)"""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s or at once on a second interruption (then re-raised)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except BaseException as cut_short:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        if not isinstance(cut_short, subprocess.TimeoutExpired):
            raise


@contextmanager
def background_service(name: str, cmd: list[str], health_url: str, *, timeout_s: float,
                       env: dict[str, str] | None = None, cwd: str | None = None) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until GET `health_url` answers 200, yield the process; the error carries the server's log
    and is a RetryableError when the server was only slow (still running at `timeout_s`) or found its port taken."""
    with tempfile.TemporaryFile(mode="w+") as log:
        guarded = [sys.executable, str(GUARD), str(os.getpid()), *cmd]  # gone with this process, even by SIGKILL
        process = subprocess.Popen(guarded, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

        def fail(why: str, error: type[PipelineError] = PipelineError) -> PipelineError:
            log.seek(0)
            text = log.read()
            if "address already in use" in text.lower():  # another process took the port: not the server's fault
                error = RetryableError
            return error(f"{name} {why}; its log ends:\n{text[-3000:]}")

        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(health_url):
                if process.poll() is not None:
                    raise fail(f"exited with {process.returncode} before answering {health_url}")
                if time.monotonic() > deadline:
                    raise fail(f"did not answer {health_url} within {timeout_s} s", RetryableError)
                time.sleep(0.5)
            yield process
        finally:
            stop(process)
