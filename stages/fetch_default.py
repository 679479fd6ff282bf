"""Fetch the built-in default data: the vaderSentiment 3.3.2 sdist from the package registry, sha256-pinned.

This is setup, not a pipeline stage: it is the only step of the default that touches the network
(the package registry pip is configured for); every stage afterwards runs offline.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.errors import PipelineError
from stages.io import atomic_path, run_main

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"


def default_target() -> Path:
    """Where params.yaml's data.source expects the sdist (the built-in default names it there)."""
    from stages.config import load_params

    source = load_params().data.source
    return source if source.name == SDIST else Path("data/external") / SDIST


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_default(target: Path) -> Path:
    """Download the sdist once; verify its sha256 whether downloaded now or earlier."""
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "vaderSentiment==3.3.2", "--dest", tmp]
            result = subprocess.run(cmd, check=False, capture_output=True, text=True)
            downloaded = Path(tmp) / SDIST
            if result.returncode != 0 or not downloaded.exists():
                raise PipelineError(f"could not download {SDIST} with pip:\n{result.stderr.strip()}")
            with atomic_path(target) as out:
                out.write_bytes(downloaded.read_bytes())
    digest = sha256_of(target)
    if digest != SDIST_SHA256:
        raise PipelineError(f"{target} has sha256 {digest}, expected {SDIST_SHA256}; delete it and fetch again")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=Path, default=None, help="default: data.source of params.yaml")
    path = fetch_default(parser.parse_args().target or default_target())
    print(f"{path} ok (sha256 {SDIST_SHA256})")


if __name__ == "__main__":
    run_main(main)
