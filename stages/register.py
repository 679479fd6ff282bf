"""register: log the run to MLflow, register the pyfunc, gate it against baseline and champion, set aliases."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import shutil
import subprocess
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from safetensors.numpy import load_file, save_file

from stages.backbone import load_tokenizer
from stages.config import PARAMS_FILE, Params, load_params
from stages.errors import PipelineError, RetryableError
from stages.evaluate import probabilities
from stages.io import log, read_json, remove_outputs, run_main, write_json
from stages.model_files import ENCODER_DIR, encoder_path, read_info
from stages.ngram import UNBLENDED
from stages.preprocess import text_key
from stages.registry import (
    CHAMPION,
    ChampionScore,
    Decision,
    VersionMissing,
    alias_version,
    apply_decision,
    configure_mlflow,
    decide,
    download_version,
    dvc_hashes,
    git_commit,
    metric_key,
    orchestration_tags,
    pipeline_written,
    text_fingerprints,
    use_experiment,
)

SERVING_CODE = Path(__file__).with_name("serving.py")
KEY_TAG = "register.key"  # version tag: the registration key (registration_key), set once the gate is applied
PENDING_TAG = "register.pending_key"  # version tag: the same key, set when the version is created
RECORD_TAG = "register.record"  # version tag: the decision record (JSON), for a run that reuses the version
SEEN_TEXTS = "seen_texts.safetensors"  # fingerprints of the texts outside the test split, logged with each run
RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "pandas", "numpy", "scikit-learn", "mlflow")


def signature(labels: list[str]) -> ModelSignature:
    outputs = [ColSpec("string", "label")] + [ColSpec("double", f"prob_{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))


def flatten(prefix: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else str(key), sub).items()}
    return {prefix: value}


def imported_stages(module: Path) -> set[str]:
    """The names of the `stages` modules `module` imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            package, _, name = node.module.partition(".")
            if package == "stages":
                names |= {name.partition(".")[0]} if name else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")}
    return names


def shipped_modules() -> list[Path]:
    """The modules of `stages` the served model imports, from `serving.py` on: what ships with each registered
    version and what its registration key hashes, so a change to the pipeline's other code makes no new version."""
    found: set[Path] = set()
    todo = [SERVING_CODE]
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo += [SERVING_CODE.with_name(f"{name}.py") for name in imported_stages(module)]
    return sorted(found | {SERVING_CODE.with_name("__init__.py")})


def backbone_files(backbone: str, into: Path) -> str:
    """What the served model needs of a linear probe's frozen backbone, copied into `into`: its config.json,
    safetensors weights and tokenizer; not the rest of its folder (pickled checkpoints, custom code, training
    state), which would ship with every version."""
    source = Path(backbone)
    into.mkdir()
    for file in [source / "config.json", *source.glob("*.safetensors"), *source.glob("*.safetensors.index.json")]:
        shutil.copy2(file, into / file.name)
    load_tokenizer(backbone).save_pretrained(into)
    return str(into)


def requirements() -> list[str]:
    return [f"{p}=={package_version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]


def log_model(model_dir: Path, labels: list[str], example: list[str]) -> mlflow.models.model.ModelInfo:
    artifacts = {"model": str(model_dir)}
    with tempfile.TemporaryDirectory() as folder:
        if not (model_dir / ENCODER_DIR).is_dir():  # a linear probe: ship the frozen backbone with it
            artifacts["encoder"] = backbone_files(encoder_path(model_dir), Path(folder) / "encoder")
        package = Path(folder) / "stages"
        package.mkdir()
        for module in shipped_modules():
            shutil.copy2(module, package / module.name)
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(SERVING_CODE), artifacts=artifacts, code_paths=[str(package)],
            signature=signature(labels), input_example=pd.DataFrame({"text": example}),
            pip_requirements=requirements())


def fingerprints(texts: pd.Series) -> np.ndarray:
    """Fingerprints of texts under preprocess's identity (case and spacing ignored), as its leakage check sees them."""
    return text_fingerprints(text_key(texts))


def seen_fingerprints(splits: pd.DataFrame) -> np.ndarray:
    """The texts of every row outside the test split (trained on, validated on, self-trained on or held out)."""
    return np.unique(fingerprints(splits.loc[splits["split"] != "test", "text"]))


def log_seen_texts(splits: pd.DataFrame, folder: Path) -> None:
    path = folder / SEEN_TEXTS
    save_file({"sha256_64": seen_fingerprints(splits)}, str(path))
    mlflow.log_artifact(str(path), artifact_path="reports")


def champion_seen_texts(client: MlflowClient, name: str, version: str, folder: Path) -> np.ndarray | None:
    """The fingerprints register logged with the champion's run; None for a version registered without them. Trouble
    reaching the tracking server is retryable, never a silent comparison on rows the champion may have trained on."""
    run_id = client.get_model_version(name, version).run_id
    try:
        if f"reports/{SEEN_TEXTS}" not in {a.path for a in client.list_artifacts(run_id, "reports")}:
            log.warning("register: champion version %s has no reports/%s in run %s: it is compared on the whole "
                        "test split, some of which it may have trained on", version, SEEN_TEXTS, run_id)
            return None
        path = client.download_artifacts(run_id, f"reports/{SEEN_TEXTS}", str(folder))
        return load_file(path)["sha256_64"]
    except (MlflowException, OSError) as error:
        raise RetryableError(f"register: could not read the champion's (version {version}) reports/{SEEN_TEXTS} "
                             f"from run {run_id}: {error}") from error


def check_same_labels(champion: mlflow.pyfunc.PyFuncModel, name: str, version: str, labels: list[str]) -> None:
    """A champion that predicts other classes is another task under the same registered name: no test split scores
    both, and promoting either would serve the wrong task to the other's clients."""
    schema = champion.metadata.get_output_schema()
    if schema is None:  # logged without a signature: nothing to compare
        return
    theirs = sorted(column.removeprefix("prob_") for column in schema.input_names()
                    if isinstance(column, str) and column.startswith("prob_"))
    if theirs and theirs != sorted(labels):  # no prob_ columns: not this project's signature, nothing to compare
        raise PipelineError(
            f"register: the champion {name}@{CHAMPION} (version {version}) predicts the labels {theirs}, this "
            f"candidate {sorted(labels)}; a classifier of other classes is another model: give it a name of its own "
            f"(register.model_name in params.yaml), or delete the alias "
            f"(MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r})) to let it replace that task")


def download_champion(name: str, version: str, folder: Path) -> Path:
    """The champion's files. A registry or artifact store that does not answer is worth a retry, not an error
    telling the operator to move the alias."""
    try:
        return download_version(name, version, folder)
    except VersionMissing as error:
        raise PipelineError(f"register: the champion {name}@{CHAMPION} (version {version}) or its files cannot "
                            f"be found ({error}); point the alias at a version that loads "
                            f"(MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, <version>)) or "
                            "delete the alias to let this candidate become the first champion") from error
    except RetryableError as error:
        raise RetryableError(f"register: the champion {name}@{CHAMPION}: {error}") from error


def champion_score(client: MlflowClient, name: str, version: str | None, test: pd.DataFrame,
                   candidate_correct: np.ndarray, labels: list[str], folder: Path) -> ChampionScore | None:
    """The current champion re-scored on this run's test rows that it never trained on, next to the candidate on
    the same rows, so the comparison is like for like even when the split changed since the champion's run."""
    if version is None:
        return None
    files = download_champion(name, version, folder / "champion")
    try:
        champion = mlflow.pyfunc.load_model(str(files))
    except Exception as error:  # whatever broke the load, the user needs the version and the way out
        raise PipelineError(
            f"register: the champion {name}@{CHAMPION} (version {version}) does not load with this checkout's code "
            f"({type(error).__name__}: {error}), so it cannot be re-scored for the gate; point the alias at a version "
            f"that loads (MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, <version>)) or delete "
            f"the alias to let this candidate become the first champion") from error
    check_same_labels(champion, name, version, labels)
    seen = champion_seen_texts(client, name, version, folder)
    new = (np.ones(len(test), dtype=bool) if seen is None else
           ~np.isin(fingerprints(test["text"]), seen))
    if not new.any():
        return ChampionScore(None, None, 0, len(test))
    texts = test.loc[new, "text"].tolist()
    predicted = champion.predict(pd.DataFrame({"text": texts}))["label"].to_numpy()
    return ChampionScore(accuracy=float(np.mean(predicted == test.loc[new, "label"].to_numpy())),
                         candidate_accuracy=float(candidate_correct[new].mean()), rows=int(new.sum()),
                         of_rows=len(test))


def lineage(params: Params) -> dict[str, str]:
    hashes = dvc_hashes(Path("dvc.lock"), {"raw": params.paths.raw, "splits": params.paths.splits,
                                             "features": params.paths.features, "model": params.paths.model})
    tags = {"git_commit": git_commit(), "pipeline.stage": "register", "strategy": params.fine_tune.strategy,
            "backbone": params.backbone.name, "data.source": str(params.data.source)}
    commit = read_info(params.paths.model).get("backbone_revision")
    if commit:
        tags["backbone.revision"] = commit
    return tags | {f"dvc.{k}": v for k, v in hashes.items()} | orchestration_tags()


def file_digests(paths: list[Path], root: Path) -> dict[str, str]:
    """SHA-256 of each file, and of each file under each folder, by its path relative to `root`."""
    files = sorted(f.resolve() for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def registration_key(params: Params) -> str:
    """What makes two registrations the same: the bytes of everything the registered version is made of or gated
    on (the model, the code that ships with it, the split, predictions and evaluation) and the gate's params."""
    paths = params.paths
    data = [paths.model, paths.splits, paths.label_map, paths.predictions, paths.evaluation, paths.metrics]
    payload = {"data": file_digests(data, Path.cwd().resolve()),
               "code": file_digests(shipped_modules(), SERVING_CODE.resolve().parent.parent),
               "packaging": {"requirements": requirements(),  # and how log_model packs what ships
                             "source": [inspect.getsource(f) for f in (log_model, backbone_files, signature)]},
               "register": params.register.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def registered_before(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    """The latest version this registry already registered and gated, aliases included, for the same key (the tag
    is set last, so a registration cut short is never reused)."""
    versions = client.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def reused_record(client: MlflowClient, version: ModelVersion) -> dict:
    """The decision record of a registration this registry already holds (a fresh clone of a project whose model
    is registered, a retried run), as it was written then: no second version of the same model, and the aliases
    stay as they are."""
    record = json.loads(version.tags[RECORD_TAG])
    return record | {"reused": True, "champion": alias_version(client, version.name, CHAMPION)}


def gate_record(decision: Decision, champion: ChampionScore | None, previous: str | None) -> dict:
    """What a gate decided, and against which champion, for `reports/registry.json` and the version's record."""
    return {"decision": "promoted" if decision.promote else "rejected", "reasons": decision.reasons,
            "champion_accuracy": champion and champion.accuracy,
            "champion_compared_on": champion and {"rows": champion.rows, "of_test_rows": champion.of_rows,
                                                  "candidate_accuracy": champion.candidate_accuracy},
            "previous_champion": previous}


def champion_moved(client: MlflowClient, record: dict, version: ModelVersion) -> bool:
    """Has a later version's gate taken `@champion` since `version`'s gate left it? Then `version`'s old decision
    is stale and it is gated again. An alias set by hand (an operator's rollback) is left as it is, and so is a
    version deploy rolled back."""
    left = str(version.version) if record["decision"] == "promoted" else record.get("previous_champion")
    now = record["champion"]
    if now in {left, str(version.version)} or "deploy.rolled_back" in version.tags:
        return False
    promoted_since = now is not None and int(now) > int(version.version) and \
        client.get_model_version(version.name, now).tags.get("gate.decision") == "promoted"
    if not promoted_since:
        log.warning("register: @champion of %s was moved to %s by hand since version %s was gated (its record, "
                    "reused, is of that gate); left as it is", version.name, now or "no version", version.version)
    return promoted_since


def regate(client: MlflowClient, params: Params, version: ModelVersion, record: dict) -> dict:
    """Gate an already registered version again, against the champion of now, and move the aliases as it says."""
    name, current = version.name, record["champion"]
    log.warning("register: @champion of %s is version %s now, not the one version %s was gated against; gating "
                "it again", name, current, version.version)
    decision, champion = gate(client, params, current, pd.read_parquet(params.paths.splits), log_texts=False)
    apply_decision(client, name, str(version.version), decision, current, take_challenger=False)
    client.set_tag(version.run_id, "gate.decision", "promoted" if decision.promote else "rejected")
    record = record | gate_record(decision, champion, current) | {"regated_against": current}
    client.set_model_version_tag(name, str(version.version), RECORD_TAG,
                                 json.dumps({k: v for k, v in record.items()
                                             if k not in {"reused", "champion", "regated_against"}}))
    client.update_model_version(name, str(version.version), description=describe(params, record))
    return record | {"champion": alias_version(client, name, CHAMPION)}


def unfinished_registration(client: MlflowClient, name: str, key: str) -> ModelVersion | None:
    """A version created for this key whose gate never finished (a run killed or failed between creating it and
    tagging its key): the retry finishes it instead of registering a second copy."""
    versions = [v for v in client.search_model_versions(f"name = '{name}' and tags.`{PENDING_TAG}` = '{key}'")
                if KEY_TAG not in v.tags]
    return min(versions, key=lambda v: int(v.version)) if versions else None  # the copy a concurrent run keeps


def champion_before(client: MlflowClient, name: str, unfinished: ModelVersion | None) -> str | None:
    """The champion this registration is gated against: the current one, or, when finishing a registration that was
    cut short after it had already taken `@champion`, the one it recorded before taking it."""
    current = alias_version(client, name, CHAMPION)
    if unfinished is not None and current == str(unfinished.version):
        recorded = unfinished.tags.get("gate.previous_champion", "none")
        return None if recorded == "none" else recorded
    return current


def drop_if_registered_concurrently(client: MlflowClient, name: str, key: str, version: str) -> None:
    """Two runs registering the same model at the same moment (two clones, a retry beside the first try) both find
    no version for its key and both create one: the lower version number is kept, the other run deletes its own."""
    first = min((int(v.version) for v in client.search_model_versions(
        f"name = '{name}' and tags.`{PENDING_TAG}` = '{key}'")), default=int(version))
    if first < int(version):
        client.delete_model_version(name, version)
        client.set_tag(mlflow.active_run().info.run_id, "register.duplicate_of", str(first))  # ends FAILED
        raise RetryableError(f"register: another run registered this model, split and gate as version {first} of "
                             f"{name} at the same moment; this run's copy (version {version}) is deleted, and a "
                             f"retry reuses or finishes version {first}")


GATE_SETTLES = 5  # gates in a row against a champion that moved meanwhile, before the run gives up (retryable)


def settled(client: MlflowClient, params: Params, splits: pd.DataFrame, version: str,
            gated: tuple[Decision, ChampionScore | None, str | None],
            ) -> tuple[Decision, ChampionScore | None, str | None]:
    """The gate's decision, score and champion, once `@champion` holds still: when another run moved it while this
    one gated (two registers against one registry), this version is gated again against the version holding it."""
    decision, champion, previous = gated
    name = params.register.model_name
    for _ in range(GATE_SETTLES):
        current = alias_version(client, name, CHAMPION)
        if current in {previous, version}:
            return decision, champion, previous
        log.warning("register: @champion of %s moved from %s to %s while version %s was gated; gating it again",
                    name, previous or "no version", current or "no version", version)
        decision, champion = gate(client, params, current, splits, log_texts=False)
        previous = current
    raise RetryableError(f"register: @champion of {name} moved {GATE_SETTLES} times while version {version} was "
                         "gated; a retry gates it again")


def gate(client: MlflowClient, params: Params, previous: str | None, splits: pd.DataFrame,
         log_texts: bool) -> tuple[Decision, ChampionScore | None]:
    """The decision for this run's candidate against the baseline and `previous` (the champion, re-scored)."""
    cfg, paths = params.register, params.paths
    evaluation = read_json(paths.evaluation)
    test = splits[splits["split"] == "test"]
    predicted = probabilities(pd.read_parquet(paths.predictions), "candidate")[test.index].argmax(axis=1)
    with tempfile.TemporaryDirectory() as folder:
        champion = champion_score(client, cfg.model_name, previous, test, predicted == test["label_id"].to_numpy(),
                                  read_json(paths.label_map)["labels"], Path(folder))
        if log_texts:
            log_seen_texts(splits, Path(folder))
    blended = read_info(paths.model).get("ngram_weight", 0) > 0
    decision = decide(evaluation["test"]["candidate"], evaluation["test"]["baseline"]["accuracy"], champion, cfg,
                      transfer_accuracy=evaluation["test"][UNBLENDED]["accuracy"] if blended else None)
    return decision, champion


def log_run(params: Params, dirty: bool) -> None:
    """Params, metrics and reports of this run into the active MLflow run."""
    paths = params.paths
    mlflow.log_params({k: str(v)[:500] for k, v in flatten("", params.model_dump(mode="json")).items()})
    mlflow.log_metrics({metric_key(k): float(v) for k, v in flatten("", read_json(paths.metrics)).items()})
    mlflow.log_metrics({f"train.{k}": float(v) for k, v in read_json(paths.training_metrics).items()})
    for path in (paths.evaluation, paths.data_report, paths.preprocess_report, paths.label_map,
                 paths.model / "model.json"):
        mlflow.log_artifact(str(path), artifact_path="reports")
    mlflow.log_artifacts(str(paths.plots), artifact_path="plots")
    log_rebuild_files(dirty)


def log_rebuild_files(dirty: bool) -> None:
    """What rebuilds this version from its git commit: this run's params.yaml and dvc.lock (a worker's are thrown
    away with its clone) and, when the run's `git_commit` is dirty, the changes behind it: `git diff --binary HEAD`
    of the tracked files the run did not write itself, and the names of untracked files (not in the diff)."""
    for path in (PARAMS_FILE, Path("dvc.lock")):
        mlflow.log_artifact(str(path), artifact_path="lineage")
    if not dirty:
        return
    with tempfile.TemporaryDirectory() as folder:
        try:
            excluded = [f":(exclude){path}" for path in sorted(pipeline_written())]
            diff = subprocess.run(["git", "diff", "--binary", "HEAD", "--", ".", *excluded], capture_output=True,
                                  check=False).stdout
            untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], capture_output=True,
                                       check=False).stdout
        except (OSError, yaml.YAMLError) as error:
            log.warning("register: git diff failed (%s); lineage/git.diff not logged", error)
            return
        for name, content in (("git.diff", diff), ("untracked.txt", untracked)):
            if content:
                (Path(folder) / name).write_bytes(content)
                mlflow.log_artifact(str(Path(folder) / name), artifact_path="lineage")


def register(params: Params) -> dict:
    """Log, register and gate one candidate, unless this registry already holds the same registration (or finish
    one cut short); return the decision record."""
    client = configure_mlflow()
    cfg, paths = params.register, params.paths
    evaluation = read_json(paths.evaluation)
    key = registration_key(params)
    if (before := registered_before(client, cfg.model_name, key)) is not None:
        log.info("register: version %s of %s already holds this model, split and gate; not registered again",
                 before.version, cfg.model_name)
        record = reused_record(client, before)
        if not champion_moved(client, record, before):
            return record
        return regate(client, params, before, record)
    splits = pd.read_parquet(paths.splits)
    unfinished = unfinished_registration(client, cfg.model_name, key)
    previous = champion_before(client, cfg.model_name, unfinished)
    if unfinished is not None:
        log.warning("register: version %s of %s was registered for this model but its gate never finished; "
                    "finishing it rather than registering a second copy", unfinished.version, cfg.model_name)
        decision, champion = gate(client, params, previous, splits, log_texts=False)
        version, run_id = str(unfinished.version), unfinished.run_id
        client.set_tag(run_id, "register.finished_after_interruption", "true")
    else:
        use_experiment(cfg.experiment)
        lineage_tags = lineage(params)
        with mlflow.start_run(tags={MLFLOW_RUN_NAME: f"{params.fine_tune.strategy}"} | lineage_tags) as run:
            log_run(params, dirty=lineage_tags["git_commit"].endswith("-dirty"))
            # Everything that can fail comes before the registry is touched.
            decision, champion = gate(client, params, previous, splits, log_texts=True)
            test_texts = splits.loc[splits["split"] == "test", "text"].head(3).tolist()
            info = log_model(paths.model, read_json(paths.label_map)["labels"], test_texts)
            tags = lineage_tags | {"run_id": run.info.run_id, PENDING_TAG: key}
            registered = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
            version, run_id = str(registered.version), run.info.run_id
            drop_if_registered_concurrently(client, cfg.model_name, key, version)
    decision, champion, previous = settled(client, params, splits, version, (decision, champion, previous))
    apply_decision(client, cfg.model_name, version, decision, previous)
    client.set_tag(run_id, "gate.decision", "promoted" if decision.promote else "rejected")
    client.set_tag(run_id, "registered_version", version)
    record = {
        "model_name": cfg.model_name, "version": version, "run_id": run_id,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "candidate_accuracy": evaluation["test"]["candidate"]["accuracy"],
        "baseline_accuracy": evaluation["test"]["baseline"]["accuracy"],
    } | gate_record(decision, champion, previous) | (
        {"finished_after_interruption": True} if unfinished is not None else {})
    client.set_model_version_tag(cfg.model_name, version, RECORD_TAG, json.dumps(record))
    client.update_model_version(cfg.model_name, version, description=describe(params, record))
    client.set_model_version_tag(cfg.model_name, version, KEY_TAG, key)  # last: the registration is complete
    return record | {"champion": alias_version(client, cfg.model_name, CHAMPION)}


def describe(params: Params, record: dict) -> str:
    """The version's description in the registry UI: what it is and what its gate decided."""
    champion = f" against version {record['previous_champion']}" if record["previous_champion"] else ""
    return (f"{params.fine_tune.strategy} on {params.backbone.name} backbone, data {params.data.source}: test accuracy "
            f"{record['candidate_accuracy']:.4f} (no-transfer baseline {record['baseline_accuracy']:.4f}); "
            f"{record['decision']}{champion} (tag register.record has every reason)")


def main() -> None:
    params = load_params()
    remove_outputs(params.paths.registry)
    record = register(params)
    write_json(record, params.paths.registry)
    log.info("register: version %s %s: %s", record["version"], record["decision"], "; ".join(record["reasons"]))


if __name__ == "__main__":
    run_main(main)
