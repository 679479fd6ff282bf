"""The pipeline as a Prefect flow: one task per dvc.yaml stage, each reproduced through DVC.

Both entry points share DVC's cache, dvc.lock and outputs: a stage whose deps and params did not
change is skipped here exactly as under `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from dvc.repo import Repo
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run

from flows.dag import StageSpec, read_dag
from flows.summary import failure_markdown, summary_markdown
from stages.io import offline_env
from stages.service import stop

SKIPPED_MARKS = ("didn't change, skipping", "is cached - skipping run")
USER_ERROR_EXIT = 2  # stages exit 2 on bad input or params: retrying cannot help
TIMEOUT_EXIT = 124
GRACE_S = 60  # Prefect's own timeout fires only if stopping the stage itself hangs
# DVC's StageCmdFailedError quotes the command verbatim (several lines for a `cmd: |` block); dvc itself exits 255
STAGE_EXIT = re.compile(r"failed to run: .*?, exited with (-?\d+)", re.DOTALL)


class StageFailed(RuntimeError):
    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def retryable(task: Task, task_run: object, state: object) -> bool:
    """Retry I/O and server trouble, not a user error that would fail the same way again."""
    try:
        error = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a state without a stored exception: let the retry policy decide
        return True
    return not (isinstance(error, StageFailed) and error.returncode == USER_ERROR_EXIT)


def stage_exit_code(output: str, dvc_returncode: int) -> int:
    """The stage command's own exit status, which `dvc repro` reports in its message and replaces with 255."""
    found = STAGE_EXIT.findall(output)
    return int(found[-1]) if found else dvc_returncode


def stage_env() -> dict[str, str]:
    """Lineage for the register stage: which Prefect flow run (and deployment) produced the version."""
    env = dict(os.environ)
    # dvc.yaml's `python -m stages.<name>` must find this interpreter even when a worker's PATH does not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env = offline_env(env)
    env["PIPELINE_PREFECT_FLOW_RUN_ID"] = str(flow_run.id or "")
    env["PIPELINE_PREFECT_DEPLOYMENT"] = str(deployment.name or "")
    return env


def up_to_date(name: str, root: str) -> bool:
    """DVC's own check, in this process: the stage's deps, params, command and outs match dvc.lock, which is what
    `dvc repro` asks before it skips a stage. Saves the ~0.7 s start of a `dvc` process per unchanged stage.
    The stage is named by its dvc.yaml's absolute path: DVC reads a bare name against the working directory."""
    dvcfile_and_stage = str(Path(root) / name) if ":" in name else f"{Path(root) / 'dvc.yaml'}:{name}"
    with Repo(root) as repo:
        return not repo.status(targets=[dvcfile_and_stage], with_deps=False)


def reproduce(name: str, root: str, timeout_s: float | None = None, pull: bool = False) -> dict[str, str | bool]:
    """`dvc repro --single-item <stage>` unless DVC says the stage is up to date; a changed stage may still be
    restored from DVC's run cache instead of run. With `pull` (a worker's fresh clone), `--pull`: the outputs a
    run-cache entry names come from the DVC remote too (`dvc pull --run-cache` fetches the entries, not them), so a
    stage another worker ran on the same inputs is restored, not run again.

    On timeout, or when the flow run is interrupted or cancelled, the whole process group goes (dvc and the stage it
    started): it runs in a session of its own, which a terminal's Ctrl-C or a worker's signal never reaches.
    """
    logger = get_run_logger()
    if up_to_date(name, root):
        logger.info("%s: up to date, skipped", name)
        return {"stage": name, "skipped": True}
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", name, *(["--pull"] if pull else [])]
    process = subprocess.Popen(command, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(process)
        raise StageFailed(f"stage {name} ran past its timeout of {timeout_s} s (meta.prefect.timeout_seconds "
                          "in dvc.yaml) and was stopped", TIMEOUT_EXIT) from None
    except BaseException:  # Ctrl-C, Prefect's cancellation (SIGTERM) or its task timeout
        logger.warning("%s: interrupted; stopping the stage", name)
        stop(process)
        raise
    output = output.strip()
    if process.returncode != 0:
        code = stage_exit_code(output, process.returncode)
        raise StageFailed(f"stage {name} failed (exit {code}):\n{output[-4000:]}", code)
    skipped = any(mark in output for mark in SKIPPED_MARKS)
    logger.info("%s: %s\n%s", name, "up to date, skipped" if skipped else "reproduced", output[-2000:])
    return {"stage": name, "skipped": skipped}


def stage_task(spec: StageSpec) -> Task:
    """A Prefect task named after the stage, with the tags, retries and timeout from its dvc.yaml meta."""
    delays = list(spec.retry_delay_seconds) if isinstance(spec.retry_delay_seconds, tuple) else spec.retry_delay_seconds
    return task(reproduce, name=spec.name, task_run_name=spec.name, tags=list(spec.tags), retries=spec.retries,
                retry_delay_seconds=delays,
                timeout_seconds=spec.timeout_seconds + GRACE_S if spec.timeout_seconds else None,
                retry_condition_fn=retryable, cache_policy=None, persist_result=False)


def dvc(args: list[str], root: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], check=False, cwd=root, env=stage_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise StageFailed(f"dvc {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}",
                          result.returncode)
    return result.stdout


@task(name="dvc-pull", task_run_name="dvc-pull", retries=2, retry_delay_seconds=[10, 60], cache_policy=None,
      persist_result=False, timeout_seconds=1800)
def pull(root: str) -> str:
    """Fetch cached data, features and models from the DVC remote, so unchanged stages need not rerun."""
    return dvc(["pull", "--allow-missing", "--run-cache"], root)


@task(name="dvc-push", task_run_name="dvc-push", retries=2, retry_delay_seconds=[10, 60], cache_policy=None,
      persist_result=False, timeout_seconds=1800)
def push(root: str) -> str:
    """Send this run's outputs to the DVC remote for the next worker, or a person, to pull."""
    return dvc(["push", "--run-cache"], root)


def publish_failure(step: str, error: BaseException, results: list[dict]) -> None:
    """The failed run's summary artifact; trouble publishing it is logged, never put in place of the step's error."""
    try:
        create_markdown_artifact(key="pipeline-summary", markdown=failure_markdown(step, error, results),
                                 description=f"The run failed at {step}")
    except Exception as trouble:  # noqa: BLE001 - any failure here must leave the original error to be raised
        get_run_logger().warning("could not publish the failure summary: %s", trouble)


@flow(name="transfer-pipeline", log_prints=True)
def pipeline(root: str = ".", pull_first: bool = False, push_after: bool = False, studies: bool = False) -> list[dict]:
    """Run every stage of dvc.yaml in dependency order; publish a run summary artifact.

    A worker on a fresh checkout sets `pull_first` (outputs from the DVC remote) and `push_after`;
    `studies` adds the stages of studies/dvc.yaml (data-efficiency curve, domain adaptation).
    """
    root = str(Path(root).resolve())
    results: list[dict] = []
    step = "dvc-pull"
    try:
        if pull_first:
            pull(root)
        for spec in read_dag(Path(root), studies):
            step = spec.name
            # --pull only where the run cache can restore the stage: on one with an uncached report (register,
            # deploy), DVC would take the missing report for data to pull, and skip the stage
            results.append(stage_task(spec)(spec.name, root, spec.timeout_seconds, pull_first and spec.run_cached))
        step = "dvc-push"
        if push_after:
            push(root)
    except Exception as error:  # the run's summary says where it stopped and why, then the flow fails
        publish_failure(step, error, results)
        raise
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(Path(root), results),
                             description="Metrics per domain, transfer gain and the registry decision")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    os.environ.update(offline_env(dict(os.environ)))
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml and params.yaml")
    parser.add_argument("--pull", action="store_true", help="dvc pull from the DVC remote first")
    parser.add_argument("--push", action="store_true", help="dvc push the outputs afterwards")
    parser.add_argument("--studies", action="store_true", help="also run studies/dvc.yaml (curve, adaptation)")
    args = parser.parse_args()
    try:
        results = pipeline(root=args.root, pull_first=args.pull, push_after=args.push, studies=args.studies)
    except StageFailed as error:  # Prefect has logged the error with the stage's output: no third copy of it here
        first = str(error).splitlines()[0]
        print(f"transfer-pipeline: {first.removesuffix(':')}; its error is in the log above", file=sys.stderr)
        sys.exit(error.returncode if 0 < error.returncode < 256 else 1)  # killed by a signal: negative
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
