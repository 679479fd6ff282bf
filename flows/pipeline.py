"""The pipeline as a Prefect flow: one task per dvc.yaml stage, each reproduced through DVC.

Both entry points share DVC's cache, dvc.lock and outputs: a stage whose deps and params did not
change is skipped here exactly as under `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run

from flows.dag import StageSpec, read_dag
from flows.summary import summary_markdown

SKIPPED_MARK = "didn't change, skipping"


class StageFailed(RuntimeError):
    pass


def stage_env() -> dict[str, str]:
    """Lineage for the register stage: which Prefect flow run (and deployment) produced the version."""
    env = dict(os.environ)
    env["PIPELINE_PREFECT_FLOW_RUN_ID"] = str(flow_run.id or "")
    env["PIPELINE_PREFECT_DEPLOYMENT"] = str(deployment.name or "")
    return env


def reproduce(name: str, root: str) -> dict[str, str | bool]:
    """`dvc repro --single-item <stage>`: runs the stage only if its deps, params or outs changed."""
    logger = get_run_logger()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=root,
                            env=stage_env(), capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise StageFailed(f"stage {name} failed (exit {result.returncode}):\n{output[-4000:]}")
    skipped = SKIPPED_MARK in output
    logger.info("%s: %s\n%s", name, "up to date, skipped" if skipped else "reproduced", output[-2000:])
    return {"stage": name, "skipped": skipped}


def stage_task(spec: StageSpec):
    """A Prefect task named after the stage, with the tags, retries and timeout from its dvc.yaml meta."""
    return task(reproduce, name=spec.name, task_run_name=spec.name, tags=list(spec.tags), retries=spec.retries,
                retry_delay_seconds=spec.retry_delay_seconds, timeout_seconds=spec.timeout_seconds,
                cache_policy=None, persist_result=False)


@flow(name="transfer-pipeline", log_prints=True)
def pipeline(root: str = ".") -> list[dict]:
    """Run every stage of dvc.yaml in dependency order; publish a run summary artifact."""
    root = str(Path(root).resolve())
    results = [stage_task(spec)(spec.name, root) for spec in read_dag(Path(root))]
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(Path(root), results),
                             description="Metrics per domain, transfer gain and the registry decision")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml and params.yaml")
    results = pipeline(root=parser.parse_args().root)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
