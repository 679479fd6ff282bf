"""`python stages/service_guard.py <pid> <command...>`: run a server command and end it, with everything it started,
once process `pid` (whoever started the server) is gone, even when that process was killed with SIGKILL and so
never stopped it itself.

`stages.service.background_service` starts this guard as the leader of a new process group; the command and its
children (`mlflow models serve` starts uvicorn) inherit that group, so stopping the group stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 20.0


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the group (the guard ignores it), SIGKILL after the grace period (the guard included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    finally:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    owner, command = int(sys.argv[1]), sys.argv[2:]
    child = subprocess.Popen(command)
    while child.poll() is None:
        if os.getppid() != owner:  # the owner died: this guard was handed to another parent
            stop_group(child)
        time.sleep(POLL_S)
    code = child.returncode
    sys.exit(code if code >= 0 else 128 - code)  # a child ended by a signal exits as a shell reports it


if __name__ == "__main__":
    main()
