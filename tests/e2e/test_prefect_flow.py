"""The Prefect flow through a real Prefect server: one task per dvc.yaml stage, sharing DVC's lock and cache."""

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from flows import stack
from flows.dag import read_dag
from flows.pipeline import stage_exit_code, up_to_date
from tests.conftest import ROOT, copy_project, make_project, project_env, registry_client, run, set_param

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
STAGES = ["ingest", "preprocess", "extract_features", "fine_tune", "evaluate", "register", "deploy"]


def test_dag_is_read_from_dvc_yaml() -> None:
    specs = read_dag(ROOT)
    assert [s.name for s in specs] == STAGES
    by_name = {s.name: s for s in specs}
    assert by_name["fine_tune"].upstream == ("extract_features", "preprocess")
    assert by_name["fine_tune"].tags == ("gpu",) and by_name["fine_tune"].retries == 0
    assert by_name["register"].retries > 0 and all(s.timeout_seconds for s in specs)
    # DVC's run cache keeps no run of a stage with an uncached report (and the flow never passes --pull to one)
    assert [s.name for s in specs if s.run_cached] == ["extract_features", "fine_tune", "evaluate"]
    with_studies = [s.name for s in read_dag(ROOT, studies=True)]
    assert with_studies[:len(STAGES)] == STAGES  # a study never holds up register and deploy
    assert set(with_studies[len(STAGES):]) == {"studies/dvc.yaml:data_efficiency", "studies/dvc.yaml:adapt"}


def _stale(root: Path) -> tuple[set[str], set[str]]:
    """Stages the flow would reproduce, and the stages `dvc repro --dry --single-item` would not skip."""
    names = [spec.name for spec in read_dag(root, studies=True)]
    dry = {name: run([sys.executable, "-m", "dvc", "repro", "--dry", "--single-item", name], root).stdout
           for name in names}
    return ({name for name in names if not up_to_date(name, str(root))},
            {name for name, output in dry.items() if "didn't change, skipping" not in output})


@pytest.mark.parametrize("cmd", ['python -c "import sys; sys.exit(2)"',
                                 '|\n      python -c "print(1)"\n      python -c "import sys; sys.exit(2)"'])
def test_the_stage_exit_code_is_read_from_dvc_repro(tmp_path: Path, cmd: str) -> None:
    """dvc exits 255 whatever the stage's own exit code; the flow's retry rule needs the stage's (2: user error)."""
    run(["git", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  bad:\n    cmd: {cmd}\n")
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "bad"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 255
    assert stage_exit_code(result.stdout + result.stderr, result.returncode) == 2
    assert stage_exit_code("ERROR: unexpected error - no such file", 255) == 255


def test_the_flow_skips_exactly_what_dvc_repro_skips(pipeline_project: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    copy_project(pipeline_project, root)
    (root / "studies").mkdir()
    shutil.copy2(ROOT / "studies" / "dvc.yaml", root / "studies" / "dvc.yaml")  # stages of another dvc.yaml, never run
    studies = {"studies/dvc.yaml:data_efficiency", "studies/dvc.yaml:adapt"}
    assert _stale(root) == (studies, studies)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fine_tune"]["linear_probe"]["C"] *= 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics = root / params["paths"]["metrics"]  # evaluate's output, register's input
    metrics.write_text(metrics.read_text() + "\n")
    changed = studies | {"fine_tune", "evaluate", "register"}
    assert _stale(root) == (changed, changed)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with stack.prefect_server(tmp_path_factory.mktemp("prefect")) as api:
        yield api


def _flow(root: Path, api: str) -> subprocess.CompletedProcess:
    env = project_env(root) | {"PREFECT_API_URL": api}
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root)], check=False, cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def _post(api: str, path: str, body: dict) -> list[dict]:
    response = requests.post(f"{api}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def test_flow_runs_the_dag_on_a_real_server(prefect_server: str, tmp_path: Path) -> None:
    root = make_project(tmp_path / "project")
    first = _flow(root, prefect_server)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    flow_runs = _post(prefect_server, "flow_runs/filter", {})
    assert len(flow_runs) == 1 and flow_runs[0]["state_type"] == "COMPLETED"
    task_runs = _post(prefect_server, "task_runs/filter", {})
    assert sorted(t["name"] for t in task_runs) == sorted(STAGES)
    assert {t["name"]: t["tags"] for t in task_runs}["extract_features"] == ["gpu"]
    artifacts = _post(prefect_server, "artifacts/filter", {})
    summary = next(a for a in artifacts if a["key"] == "pipeline-summary")["data"]
    assert "transfer gain" in summary and "Registry:" in summary


    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version_by_alias("transfer-classifier", "champion")
    assert version.tags["prefect.flow_run_id"] == flow_runs[0]["id"]

    # Same lock and cache as `dvc repro`: nothing changed, so nothing runs, under either entry point.
    second = _flow(root, prefect_server)
    assert second.returncode == 0 and '"skipped": false' not in second.stdout
    assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "repro"], root).stdout


def test_a_failing_stage_fails_the_flow(prefect_server: str, tmp_path: Path) -> None:
    root = make_project(tmp_path / "broken", {"preprocess": {"train_domains": ["films"]}})
    result = _flow(root, prefect_server)
    assert result.returncode != 0
    assert "preprocess.train_domains names ['films']" in result.stdout + result.stderr


def test_a_user_error_is_not_retried(prefect_server: str, tmp_path: Path) -> None:
    """ingest has retries for I/O trouble; a missing column fails it the same way every time, so it runs once."""
    root = make_project(tmp_path / "bad-column", {"data": {"text_column": "review"}})
    result = _flow(root, prefect_server)
    assert result.returncode == 2, result.stderr[-3000:]  # the stage's own exit code: bad input, do not retry
    assert "column 'review' (from data.text_column) not found" in result.stdout + result.stderr
    assert result.stderr.rstrip().endswith("stage ingest failed (exit 2); its error is in the log above")
    (flow_run,) = [r for r in _post(prefect_server, "flow_runs/filter", {}) if r["parameters"]["root"] == str(root)]
    (ingest,) = _post(prefect_server, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert ingest["name"] == "ingest" and ingest["run_count"] == 1 and ingest["state_type"] == "FAILED"
    artifacts = _post(prefect_server, "artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    summary = next(a for a in artifacts if a["key"] == "pipeline-summary")["data"]
    assert "Failed at `ingest`" in summary and "column 'review' (from data.text_column) not found" in summary


def test_deployment_declares_cron_schedule_on_the_gpu_pool(prefect_server: str, tmp_path: Path) -> None:
    root = make_project(tmp_path / "deploy")
    env = project_env(root) | {"PREFECT_API_URL": prefect_server, "PIPELINE_PROJECT_DIR": str(root)}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for cmd in (["work-pool", "create", "gpu-pool", "--type", "process"], ["deploy", "--all"]):
        result = subprocess.run([*prefect, *cmd], check=False, cwd=root, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (deployment,) = _post(prefect_server, "deployments/filter", {})
    assert deployment["name"] == "nightly" and deployment["work_pool_name"] == "gpu-pool"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"


def test_a_stage_past_its_timeout_is_stopped_with_its_children(prefect_server: str, tmp_path: Path) -> None:
    root = make_project(tmp_path / "slow")
    dag = (root / "dvc.yaml").read_text()
    (root / "dvc.yaml").write_text(dag.replace("prefect: {tags: [gpu], timeout_seconds: 3600}",
                                               "prefect: {tags: [gpu], timeout_seconds: 1}"))
    result = _flow(root, prefect_server)
    assert result.returncode != 0
    assert "extract_features ran past its timeout of 1" in result.stdout + result.stderr
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline", "cwd"])  # this project's stage only
                 if "stages.extract_features" in " ".join(p.info["cmdline"] or []) and p.info["cwd"] == str(root)]
    assert not leftovers, f"the stage process outlived its timeout: {leftovers}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a worker cancelling the run
@pytest.mark.usefixtures("sigint_reaches_children")
def test_an_interrupted_flow_stops_the_stage_it_was_running(prefect_server: str, tmp_path: Path,
                                                            sig: signal.Signals) -> None:
    root = make_project(tmp_path / "interrupted")
    dag = (root / "dvc.yaml").read_text()  # a stage that is still running when the signal comes
    (root / "dvc.yaml").write_text(dag.replace("cmd: python -m stages.extract_features",
                                               'cmd: python -c "import time; time.sleep(600)" && '
                                               "python -m stages.extract_features"))
    env = project_env(root) | {"PREFECT_API_URL": prefect_server}
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--root", str(root)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stage_processes() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline", "cwd"])
                if "time.sleep(600)" in " ".join(p.info["cmdline"] or []) and p.info["cwd"] == str(root)]

    try:
        deadline = time.monotonic() + 300
        while not stage_processes():
            assert flow.poll() is None and time.monotonic() < deadline, "extract_features never started"
            time.sleep(0.2)
        flow.send_signal(sig)
        assert flow.wait(timeout=120) != 0
    finally:
        flow.kill()
    _, alive = psutil.wait_procs(stage_processes(), timeout=30)
    assert not alive, "the stage outlived the interrupted flow"


def test_a_worker_restores_a_stage_another_worker_ran_from_the_remote_run_cache(prefect_server: str,
                                                                               pipeline_project: Path,
                                                                               tmp_path: Path) -> None:
    """A worker's fresh clone whose committed dvc.lock predates a param change (the worker that ran it threw its
    dvc.lock away with its clone): a stage that worker ran on the same inputs comes back from the DVC remote's run
    cache (`dvc repro --pull`), instead of running again."""
    remote = tmp_path / "remote"
    earlier = copy_project(pipeline_project, tmp_path / "earlier")
    worker = copy_project(pipeline_project, tmp_path / "worker")
    for root in (earlier, worker):
        run([*DVC, "remote", "add", "-f", "-d", "local", str(remote)], root)
        set_param(root, "preprocess", "seed", 1)  # committed, with dvc.lock still of seed 0
    run([*DVC, "push"], earlier)  # seed 0's outputs: what the committed dvc.lock names
    run([*DVC, "repro", "extract_features"], earlier)
    run([*DVC, "push", "--run-cache"], earlier)
    for output in ("data/raw", "data/processed", "data/features", "models", ".dvc/cache"):  # not in a fresh clone
        shutil.rmtree(worker / output, ignore_errors=True)
    env = project_env(worker) | {"PREFECT_API_URL": prefect_server}
    flow = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(worker), "--pull"], check=False,
                          cwd=worker, env=env, capture_output=True, text=True, timeout=900)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    log = flow.stdout + flow.stderr
    # preprocess writes an uncached report, so DVC keeps no run-cache entry for it: it runs, and gives the same split
    assert "Running stage 'preprocess'" in log
    assert "Stage 'extract_features' is cached - skipping run" in log
    assert "Running stage 'fine_tune'" in log  # never run on seed 1's split: nothing to restore
