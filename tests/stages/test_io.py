"""stages.io: outputs appear whole or not at all, also when a stage is stopped mid-write."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stages.io import atomic_path, remove_outputs, write_json
from tests.conftest import ROOT

STOPPED_MID_WRITE = """
import sys, time
from pathlib import Path
from stages.io import atomic_path, run_main

def main():
    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.mkdir()
        (tmp / "part.bin").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)

run_main(main)
"""


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json({"old": 1}, target)
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("disk trouble")
    assert target.read_text() == '{\n  "old": 1\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_stage_stopped_by_sigterm_removes_its_temporary_output(tmp_path: Path) -> None:
    target = tmp_path / "features"
    process = subprocess.Popen([sys.executable, "-c", STOPPED_MID_WRITE, str(target)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    assert next(p.name for p in tmp_path.iterdir()).startswith(".features.")  # the write is under way
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_removes_the_temporary_output_without_a_traceback(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", STOPPED_MID_WRITE, str(tmp_path / "features")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGINT and stderr.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_what_a_killed_write_left(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: the stage's next start removes the temporary sibling."""
    target = tmp_path / "features"
    process = subprocess.Popen([sys.executable, "-c", STOPPED_MID_WRITE, str(target)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait(timeout=30)
    (tmp_path / "features.json").write_text("a neighbour, kept")
    (tmp_path / ".features.json.abcd1234").mkdir()  # another output's temporary: not this one's to remove
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".features.")]) == 2
    remove_outputs(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".features.json.abcd1234", "features.json"]
