"""Time the whole default pipeline cold, stage by stage, and its peak memory; then a no-op `dvc repro` and no-op
runs of the Prefect flow: as `python -m flows.pipeline` (a temporary Prefect server of its own, started and stopped
by the run) and against a running Prefect server (PREFECT_API_URL, as scheduled runs on workers are). Each no-op
figure is the median of NOOP_REPEATS runs (all of them are in the JSON), after one untimed run that creates the
Prefect database or registers the flow.

Runs in a throw-away copy of the project (code, params, the fetched default data) with its own MLflow
registry, so the project's own outputs, dvc.lock and registry are untouched.

Run from the project root:  python -m benchmarks.pipeline [--set KEY=VALUE ...] [--out FILE.json]
(--set changes the copy's params.yaml as `dvc exp run -S` would, e.g. --set fine_tune.finetune.epochs=3)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import set_key, write_report
from benchmarks.accuracy import parse_set
from flows.stack import prefect_server
from stages.config import load_params

COPIED = ["stages", "flows", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]


def make_copy(root: Path, target: Path) -> None:
    for name in COPIED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    data = load_params(root / "params.yaml").data.source
    (target / data).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / data, target / data)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def set_params(params_file: Path, overrides: list[str]) -> None:
    """Apply `--set a.b.c=value` overrides to a params file (as `dvc exp run -S` would), then validate it."""
    params = yaml.safe_load(params_file.read_text())
    for key, value in map(parse_set, overrides):
        set_key(params, key, value)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(params_file)


def bench_env(project: Path) -> dict[str, str]:
    """The copy's own MLflow registry, offline."""
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}


def timed_repro(project: Path) -> tuple[float, dict[str, float], str]:
    """Wall time of `dvc repro` and of each stage (from when DVC announces it to when the next starts)."""
    env = bench_env(project)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks, lines = [], []
    for line in process.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
    process.wait()
    total = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"dvc repro failed:\n{''.join(lines)[-4000:]}")
    ends = [t for _, t in marks[1:]] + [start + total]
    return total, {name: round(end - t, 1) for (name, t), end in zip(marks, ends)}, "".join(lines)


def timed_noop_flow(project: Path, n_stages: int, api: str | None = None) -> tuple[float, bool]:
    """Wall time of `python -m flows.pipeline` on an up-to-date project, and whether it skipped every stage. Without
    `api` the run starts its own temporary Prefect server (Prefect home inside the copy)."""
    env = bench_env(project) | {"PREFECT_HOME": str(project / ".prefect")} | ({"PREFECT_API_URL": api} if api else {})
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the Prefect flow failed:\n{result.stdout[-4000:]}")
    return seconds, result.stdout.count("up to date, skipped") == n_stages


NOOP_REPEATS = 3


def timed_noop_flows(project: Path, n_stages: int, api: str | None = None) -> tuple[list[float], bool]:
    """NOOP_REPEATS timed no-op flow runs after an untimed one, and whether every run skipped every stage."""
    runs = [timed_noop_flow(project, n_stages, api) for _ in range(NOOP_REPEATS + 1)][1:]
    return [round(seconds, 1) for seconds, _ in runs], all(skipped for _, skipped in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for the copy, as `dvc exp run -S` takes it (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    root = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        project = Path(tmp)
        make_copy(root, project)
        set_params(project / "params.yaml", args.set)
        cold, stages, _ = timed_repro(project)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        noop, _, output = timed_repro(project)
        flows, flow_skipped = timed_noop_flows(project, len(stages))
        with prefect_server(project / ".prefect-server") as api:
            flows_server, flow_server_skipped = timed_noop_flows(project, len(stages), api)
        metrics = json.loads((project / load_params(project / "params.yaml").paths.metrics).read_text())
    result = {"cold_seconds": round(cold, 1), "stage_seconds": stages, "peak_rss_mib_largest_stage": round(peak_mib),
              "noop_seconds": round(noop, 1), "noop_ran_nothing": "Running stage" not in output,
              "noop_flow_seconds": statistics.median(flows), "noop_flow_on_server_seconds": statistics.median(flows_server),
              "noop_flow_runs_seconds": flows, "noop_flow_on_server_runs_seconds": flows_server,
              "noop_flow_ran_nothing": flow_skipped and flow_server_skipped,
              "test": metrics["test"], "domains": metrics["domains"], "cpu_count": os.cpu_count(),
              "params_set": args.set}
    print(f"cold dvc repro: {result['cold_seconds']} s   peak memory (largest stage): {result['peak_rss_mib_largest_stage']} MiB")
    for name, seconds in stages.items():
        print(f"  {name:<18} {seconds:>7.1f} s")
    print(f"no-op dvc repro: {result['noop_seconds']} s (ran nothing: {result['noop_ran_nothing']})")
    print(f"no-op Prefect flow (median of {NOOP_REPEATS}): {result['noop_flow_seconds']} s with its own temporary "
          f"server {flows}, {result['noop_flow_on_server_seconds']} s on a running server {flows_server} (skipped every stage: "
          f"{result['noop_flow_ran_nothing']})")
    print(f"{'group':<10} {'candidate':>9} {'unblended':>9} {'baseline':>9} {'gain':>8}")
    for group, m in {"test": metrics["test"], **metrics["domains"]}.items():
        print(f"{group:<10} {m['candidate_accuracy']:>9.4f} {m.get('unblended_accuracy', float('nan')):>9.4f} "
              f"{m['baseline_accuracy']:>9.4f} {m['transfer_gain']:>+8.4f}")
    if args.out:
        write_report(result, args.out)


if __name__ == "__main__":
    main()
