"""MLflow plumbing shared by register, deploy and batch prediction: tracking URI, lineage, the gate, aliases."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import requests
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.rest_utils import http_request

from stages.config import RegisterConfig
from stages.errors import RetryableError

CHAMPION, CHALLENGER = "champion", "challenger"


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits and `_-. /:`, and no leading `/`, `//` or `..`; user domain names may hold
    anything."""
    key = re.sub(r"[^\w.\- /:]", "_", key)
    return re.sub(r"/{2,}", "/", key.replace("..", "__")).lstrip("/") or "_"


def project_root() -> Path:
    """The project: DVC_ROOT, which DVC sets for every stage it runs and, in a queued or temporary `dvc exp run`,
    points at the project rather than the temporary copy the stage runs in; else the current directory."""
    inside_dvc = os.environ.get("DVC_STAGE")  # set with DVC_ROOT for each stage: a DVC_ROOT inherited elsewhere is not
    return Path((inside_dvc and os.environ.get("DVC_ROOT")) or ".").resolve()


def project_registry() -> str:
    """The project's own registry: an sqlite file inside it (works offline)."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or project_registry()


def check_answers(uri: str) -> None:
    """A tracking server that does not answer fails at once and retryably (MLflow's client would retry for minutes,
    then end in a traceback). Any answer below 500 counts: /health may sit behind authentication."""
    if not uri.startswith(("http://", "https://")):
        return
    try:  # through MLflow's own client: its credentials and TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH, ...)
        status = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=10,
                              raise_on_status=False).status_code
    except (requests.RequestException, MlflowException) as error:
        why = str(error)[:600]
    else:
        if status < 500:
            return
        why = f"HTTP {status}"
    raise RetryableError(f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer ({why}); start it, "
                         "or point MLFLOW_TRACKING_URI at one that runs")


def configure_mlflow() -> MlflowClient:
    uri = tracking_uri()
    check_answers(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use_experiment(name: str) -> None:
    """mlflow.set_experiment; in the project's own registry, an experiment created here keeps its artifacts in the
    project's mlruns/ (MLflow would put them below the current directory: a queued experiment's temporary copy)."""
    if mlflow.get_tracking_uri() == project_registry() and mlflow.get_experiment_by_name(name) is None:
        with suppress(MlflowException):  # created meanwhile by a concurrent run
            mlflow.create_experiment(name, artifact_location=(project_root() / "mlruns" / name).as_uri())
    mlflow.set_experiment(name)


LOCK_FILES = (Path("dvc.lock"), Path("studies/dvc.lock"))


def pipeline_written(lock_files: tuple[Path, ...] = LOCK_FILES) -> set[str]:
    """The git-tracked files a run itself rewrites: the lock files and the stages' outputs they list (metrics and
    reports kept in git), relative to the repository root."""
    written = {lock.as_posix() for lock in lock_files}
    for lock in lock_files:
        if lock.is_file() and lock.with_name("dvc.yaml").is_file():
            locked = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
            declared = (yaml.safe_load(lock.with_name("dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
            for name, stage in locked.items():
                wdir = lock.parent / declared.get(name, {}).get("wdir", ".")
                written |= {os.path.normpath(wdir / out["path"]) for out in stage.get("outs", [])}
    return written


def git_commit() -> str:
    """HEAD, with `-dirty` when tracked files other than what the pipeline writes itself differ from it: a run
    always rewrites dvc.lock and its git-kept metrics, and those are recorded as DVC hashes next to the commit."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # paths relative to the project (which may sit below the repository's root), unquoted
        changed = subprocess.run(["git", "diff", "HEAD", "--name-only", "--no-renames", "--relative", "-z"],
                                 capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    try:
        written = pipeline_written()
    except yaml.YAMLError:  # a lock file being rewritten or broken: only it is known to be the run's
        written = {lock.as_posix() for lock in LOCK_FILES}
    dirty = [path for path in changed if path and not any(path == out or path.startswith(f"{out}/")
                                                          for out in written)]
    return f"{sha}{'-dirty' if dirty else ''}"


def dvc_hashes(lock_file: Path, paths: dict[str, Path]) -> dict[str, str]:
    """md5 of each named output as recorded in dvc.lock by the stages that produced them."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    recorded = {out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values()
                for out in stage.get("outs", [])}
    return {name: recorded[str(path)] for name, path in paths.items() if str(path) in recorded}


@contextmanager
def study_run(experiment: str, stage: str, run_name: str, lineage: dict[str, Path]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for a study stage, tagged like register's runs: git commit, DVC hashes of its inputs, Prefect."""
    configure_mlflow()
    use_experiment(experiment)
    hashes = dvc_hashes(Path("dvc.lock"), lineage)
    tags = {MLFLOW_RUN_NAME: run_name, "git_commit": git_commit(), "pipeline.stage": stage,
            **{f"dvc.{k}": v for k, v in hashes.items()}, **orchestration_tags()}
    with mlflow.start_run(tags=tags) as run:
        yield run


def orchestration_tags() -> dict[str, str]:
    """Prefect flow-run id and deployment, passed down by flows.pipeline when Prefect runs the stage."""
    names = {"PIPELINE_PREFECT_FLOW_RUN_ID": "prefect.flow_run_id", "PIPELINE_PREFECT_DEPLOYMENT": "prefect.deployment"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChampionScore:
    """Champion and candidate accuracy on the test rows the champion never saw in training (`rows` of `of_rows`: a
    champion trained on another split may have trained on some of this split's test rows)."""
    accuracy: float | None      # None when no test row is new to the champion
    candidate_accuracy: float | None
    rows: int
    of_rows: int


def text_fingerprints(texts: Iterable[str]) -> np.ndarray:
    """The first 8 bytes of each text's SHA-256, as uint64: which texts a model saw, without storing the texts."""
    return np.array([int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "little") for t in texts],
                    dtype=np.uint64)


def champion_check(champion: ChampionScore, cfg: RegisterConfig) -> tuple[bool, str]:
    if champion.accuracy is None or champion.candidate_accuracy is None:
        return False, (f"gain over champion: none of the {champion.of_rows} test rows is new to the champion (it "
                       "trained on them), so the two cannot be compared; move @champion by hand if this candidate "
                       "should replace it")
    gain = champion.candidate_accuracy - champion.accuracy
    rows = ("the same test set" if champion.rows == champion.of_rows else
            f"the {champion.rows} of {champion.of_rows} test rows the champion never trained on")
    return gain > cfg.min_gain_over_champion, (
        f"gain over champion {gain:+.4f} (champion {champion.accuracy:.4f}, candidate "
        f"{champion.candidate_accuracy:.4f} on {rows}) must exceed register.min_gain_over_champion "
        f"{cfg.min_gain_over_champion}")


def decide(candidate: dict[str, float], baseline_accuracy: float, champion: ChampionScore | None,
           cfg: RegisterConfig, transfer_accuracy: float | None = None) -> Decision:
    """The promotion gate: thresholds, then beat the no-transfer baseline, then beat the champion on test rows it
    never trained on. The baseline check takes `transfer_accuracy`, the transferred model's before fine_tune.blend
    mixed the baseline in (default: the candidate's), so that a blend cannot carry a transfer that lost to the
    baseline."""
    reasons, ok = [], True
    transfer = candidate["accuracy"] if transfer_accuracy is None else transfer_accuracy
    before_blend = "" if transfer_accuracy is None else " (before the n-gram blend)"
    checks = [
        (candidate["accuracy"] >= cfg.min_accuracy,
         f"accuracy {candidate['accuracy']:.4f} vs register.min_accuracy {cfg.min_accuracy}"),
        (candidate["macro_f1"] >= cfg.min_macro_f1,
         f"macro_f1 {candidate['macro_f1']:.4f} vs register.min_macro_f1 {cfg.min_macro_f1}"),
        (transfer - baseline_accuracy > cfg.min_gain_over_baseline,
         (f"gain over baseline{before_blend} {transfer - baseline_accuracy:+.4f} must exceed "
          f"register.min_gain_over_baseline {cfg.min_gain_over_baseline}")),
    ]
    if champion is not None:
        checks.append(champion_check(champion, cfg))
    else:
        reasons.append("no champion yet")
    for passed, text in checks:
        reasons.append(("pass: " if passed else "FAIL: ") + text)
        ok = ok and passed
    return Decision(promote=ok, reasons=reasons)


class VersionMissing(Exception):
    """A registered version, or its files, that the registry no longer has."""


def download_version(name: str, version: str, folder: Path) -> Path:
    """A registered version's files. VersionMissing when the registry says they are gone; RetryableError when the
    registry or artifact store does not answer (down, HTTP 5xx), which says nothing about the version."""
    try:
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(folder)))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise VersionMissing(str(error)) from error
        transient: Exception = error
    except (OSError, requests.RequestException) as error:
        transient = error
    raise RetryableError(f"could not download {name} version {version} from the registry: {transient}") \
        from transient


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def apply_decision(client: MlflowClient, name: str, version: str, decision: Decision,
                   previous_champion: str | None, take_challenger: bool = True) -> None:
    """Aliases follow the decision (a rejected version becomes `@challenger` unless `take_challenger` is false: an
    older version gated again); the version's tags keep why, so history is queryable in the registry."""
    client.set_model_version_tag(name, version, "gate.decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(name, version, "gate.reasons", "; ".join(decision.reasons)[:4900])
    client.set_model_version_tag(name, version, "gate.previous_champion", previous_champion or "none")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        if alias_version(client, name, CHALLENGER) is not None:
            client.delete_registered_model_alias(name, CHALLENGER)
    elif take_challenger:
        client.set_registered_model_alias(name, CHALLENGER, version)


def rollback(client: MlflowClient, name: str, failed_version: str, previous_champion: str | None, why: str) -> None:
    """Put `@champion` back where it was before `failed_version` took it."""
    client.set_model_version_tag(name, failed_version, "deploy.rolled_back", why[:4900])
    if previous_champion:
        client.set_registered_model_alias(name, CHAMPION, previous_champion)
    else:
        client.delete_registered_model_alias(name, CHAMPION)
    client.set_registered_model_alias(name, CHALLENGER, failed_version)
