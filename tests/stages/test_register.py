import hashlib
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import pytest
import yaml

from stages.errors import RetryableError
from stages.io import read_json
from stages.preprocess import text_key
from stages.register import fingerprints, shipped_modules
from stages.registry import (
    ChampionScore,
    alias_version,
    configure_mlflow,
    decide,
    git_commit,
    project_registry,
    text_fingerprints,
    use_experiment,
)
from stages.service import free_port
from tests.conftest import ROOT, registry_client, repo_cfg, run, set_param

CANDIDATE = {"accuracy": 0.80, "macro_f1": 0.79}
NO_THRESHOLDS = {"min_accuracy": 0.0, "min_macro_f1": 0.0, "min_gain_over_baseline": 0.0, "min_gain_over_champion": 0.0}


def gate(**thresholds: float) -> object:
    return repo_cfg("register", **(NO_THRESHOLDS | thresholds))


def scored(champion: float | None) -> ChampionScore | None:
    """A champion scored on the same 1,000 test rows as CANDIDATE."""
    return None if champion is None else ChampionScore(champion, CANDIDATE["accuracy"], 1000, 1000)


def test_gate_promotes_only_a_candidate_that_beats_everything() -> None:
    cfg = gate(min_accuracy=0.7, min_macro_f1=0.7)
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion=None, cfg=cfg).promote
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion=scored(0.78), cfg=cfg).promote


def test_a_blend_cannot_carry_a_transferred_model_that_lost_to_the_baseline() -> None:
    decision = decide(CANDIDATE, baseline_accuracy=0.78, champion=None, cfg=gate(), transfer_accuracy=0.77)
    assert not decision.promote  # the blended candidate (0.80) beats the baseline, the transfer alone (0.77) does not
    assert "FAIL: gain over baseline (before the n-gram blend) -0.0100" in decision.reasons[-1]


@pytest.mark.parametrize(("baseline", "champion", "cfg", "failed"), [
    (0.85, None, gate(), "gain over baseline"),
    (0.70, 0.80, gate(), "gain over champion"),  # a tie does not dethrone the champion
    (0.70, None, gate(min_accuracy=0.9), "register.min_accuracy"),
    (0.70, 0.70, gate(min_gain_over_champion=0.2), "register.min_gain_over_champion"),
])
def test_gate_rejects_and_says_why(baseline: float, champion: float | None, cfg: object, failed: str) -> None:
    decision = decide(CANDIDATE, baseline, scored(champion), cfg)
    assert not decision.promote
    assert any(r.startswith("FAIL") and failed in r for r in decision.reasons)


def test_the_champion_is_compared_on_rows_it_never_trained_on() -> None:
    # the candidate scores 0.80 on the whole test split, but only 0.70 on the rows new to the champion
    decision = decide(CANDIDATE, 0.7, ChampionScore(0.72, 0.70, 300, 1000), gate())
    assert not decision.promote
    assert "FAIL: gain over champion -0.0200 (champion 0.7200, candidate 0.7000 on the 300 of 1000 test rows the " \
           "champion never trained on)" in decision.reasons[-1]
    nothing_new = decide(CANDIDATE, 0.7, ChampionScore(None, None, 0, 1000), gate())
    assert not nothing_new.promote and "none of the 1000 test rows is new to the champion" in nothing_new.reasons[-1]


def test_the_code_that_ships_with_the_model_is_what_serving_imports_and_imports_on_its_own(tmp_path: Path) -> None:
    shipped = {module.name for module in shipped_modules()}
    assert {"__init__.py", "serving.py", "model.py", "backbone.py", "ngram.py", "texts.py"} <= shipped
    assert not shipped & {"register.py", "deploy.py", "fine_tune.py", "ingest.py", "config.py", "io.py"}
    package = tmp_path / "stages"
    package.mkdir()
    for module in shipped_modules():
        (package / module.name).write_bytes(module.read_bytes())
    register_deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]["deps"]
    assert {f"stages/{name}" for name in shipped - {"__init__.py"}} <= set(register_deps)  # DVC reruns register
    check = ("import stages, stages.model, stages.ngram, stages.texts; from stages.serving import TextClassifierModel; "
             f"assert stages.__file__.startswith({str(tmp_path)!r}), stages.__file__")
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, check=True, capture_output=True, text=True)


def test_text_fingerprints_are_stable_and_distinct() -> None:
    prints = text_fingerprints(["a film", "a film", "a Film", ""])
    assert prints.dtype.name == "uint64" and prints[0] == prints[1] and len(set(prints.tolist())) == 3
    assert int(prints[0]) == int.from_bytes(hashlib.sha256(b"a film").digest()[:8], "little")
    # register fingerprints texts as preprocess identifies them: case and spacing do not make a text new
    assert fingerprints(pd.Series(["A  Film", "a film"])).tolist() == [int(prints[0])] * 2


def test_registry_aliases_follow_the_gate(registered: Path) -> None:
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    register = [sys.executable, "-m", "stages.register"]
    first = read_json(root / "reports/registry.json")  # what `dvc repro` registered into the empty registry
    name = first["model_name"]
    assert first["decision"] == "promoted" and first["previous_champion"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # a linear probe ships its frozen backbone: the config, safetensors weights and tokenizer, nothing else of the
    # folder (the default's holds a README, sentence-transformers' pooling config and more)
    encoder = mlflow.artifacts.list_artifacts(f"models:/{name}/1/artifacts/encoder", tracking_uri=client.tracking_uri)
    shipped = {Path(a.path).name for a in encoder}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= shipped
    assert not shipped & {"README.md", "1_Pooling", "modules.json", ".gitattributes"}, shipped

    set_param(root, "register", "min_gain_over_champion", 0.5)  # the same model cannot beat itself by 0.5
    run(register, root)
    second = read_json(root / "reports/registry.json")
    assert second["decision"] == "rejected" and second["champion_accuracy"] is not None
    # the champion, loaded through MLflow's pyfunc (blend included), scores what evaluate scored
    assert second["champion_accuracy"] == first["candidate_accuracy"]
    same_split = second["champion_compared_on"]  # nothing changed the split, so every test row is new to it
    assert same_split["rows"] == same_split["of_test_rows"] and same_split["candidate_accuracy"] == pytest.approx(
        second["candidate_accuracy"])
    assert any("gain over baseline (before the n-gram blend)" in r for r in second["reasons"])
    assert any(r.startswith("FAIL: gain over champion") for r in second["reasons"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "2").tags["gate.decision"] == "rejected"

    set_param(root, "register", "min_gain_over_champion", -0.5)
    run(register, root)
    third = read_json(root / "reports/registry.json")
    assert third["decision"] == "promoted" and third["previous_champion"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    version = client.get_model_version(name, "3")
    assert version.tags["gate.previous_champion"] == "1"
    assert version.description.startswith("linear_probe on default backbone, data ") and \
        f"test accuracy {third['candidate_accuracy']:.4f}" in version.description and \
        "promoted against version 1" in version.description
    assert len(version.tags["git_commit"]) >= 40 and version.tags["dvc.raw"] and version.tags["dvc.features"]
    run_data = client.get_run(third["run_id"]).data
    assert run_data.metrics["test.candidate_accuracy"] == pytest.approx(third["candidate_accuracy"], abs=1e-4)
    training = read_json(root / "metrics/training.json")
    assert run_data.metrics["train.probe_val_accuracy"] == pytest.approx(training["probe_val_accuracy"])
    assert run_data.params["fine_tune.strategy"] == "linear_probe"
    lineage = {a.path for a in client.list_artifacts(third["run_id"], "lineage")}
    assert {"lineage/params.yaml", "lineage/dvc.lock", "lineage/git.diff"} <= lineage  # set_param changed params.yaml
    logged = Path(client.download_artifacts(third["run_id"], "lineage/params.yaml", str(root / "download")))
    assert logged.read_text() == (root / "params.yaml").read_text()
    diff = Path(client.download_artifacts(third["run_id"], "lineage/git.diff", str(root / "download"))).read_text()
    assert "params.yaml" in diff and "dvc.lock" not in diff  # what the run wrote itself is in lineage/dvc.lock


def test_the_same_registration_is_not_registered_twice(registered: Path) -> None:
    """A fresh clone of a registered project, or a retried run: same model, split and gate, so no second version."""
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    first = read_json(root / "reports/registry.json")  # what `dvc repro` registered into the empty registry
    run([sys.executable, "-m", "stages.register"], root)
    again = read_json(root / "reports/registry.json")
    assert again == first | {"reused": True}  # the record as it was written then, champion comparison included
    assert [str(v.version) for v in client.search_model_versions(f"name = '{first['model_name']}'")] == ["1"]
    assert client.get_model_version(first["model_name"], "1").tags["register.key"]
    # code that does not ship with the model (the pipeline's other stages) makes no new version
    deploy = root / "stages" / "deploy.py"
    deploy.write_text(deploy.read_text() + "\n# changed\n")
    run([sys.executable, "-m", "stages.register"], root)
    assert read_json(root / "reports/registry.json") == first | {"reused": True}
    # the code the served model imports ships inside it: changed, it is a new registration
    serving = root / "stages" / "serving.py"
    serving.write_text(serving.read_text() + "\n# changed\n")
    run([sys.executable, "-m", "stages.register"], root)
    changed = read_json(root / "reports/registry.json")
    assert "reused" not in changed and changed["version"] == "2"


def test_a_reused_version_is_gated_again_when_the_champion_moved_since(registered: Path) -> None:
    """Back on the params of version 1 after version 2 took `@champion`: version 1 is not registered again, but its
    old "promoted" would be stale, so it is gated against version 2 (the same model: a tie keeps the champion)."""
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    name = read_json(root / "reports/registry.json")["model_name"]
    set_param(root, "register", "min_gain_over_champion", -0.5)
    run([sys.executable, "-m", "stages.register"], root)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    set_param(root, "register", "min_gain_over_champion", 0.0)
    result = run([sys.executable, "-m", "stages.register"], root)
    regated = read_json(root / "reports/registry.json")
    assert "version 1 was gated against; gating it again" in result.stderr
    assert {k: regated[k] for k in ("version", "decision", "previous_champion", "regated_against", "champion")} == {
        "version": "1", "decision": "rejected", "previous_champion": "2", "regated_against": "2", "champion": "2"}
    assert any("gain over champion +0.0000" in reason for reason in regated["reasons"])
    assert alias_version(client, name, "challenger") is None  # an old version gated again is no new challenger
    run([sys.executable, "-m", "stages.register"], root)  # nothing moved since: the record as the last gate wrote it
    again = read_json(root / "reports/registry.json")
    assert again == {k: v for k, v in regated.items() if k != "regated_against"}
    assert client.get_run(regated["run_id"]).data.tags["gate.decision"] == "rejected"
    client.set_registered_model_alias(name, "champion", "1")  # by hand, to this very version: nothing to gate
    run([sys.executable, "-m", "stages.register"], root)
    assert read_json(root / "reports/registry.json") == again | {"champion": "1"}
    # an operator's rollback by hand, from the version the gate promoted to an older one, is left as it is
    client.set_registered_model_alias(name, "champion", "2")
    set_param(root, "register", "min_gain_over_champion", -0.4)
    run([sys.executable, "-m", "stages.register"], root)
    assert read_json(root / "reports/registry.json")["version"] == "3"  # promoted over version 2
    client.set_registered_model_alias(name, "champion", "2")
    result = run([sys.executable, "-m", "stages.register"], root)
    kept = read_json(root / "reports/registry.json")
    assert "was moved to 2 by hand since version 3 was gated" in result.stderr
    assert (kept["version"], kept["decision"], kept["champion"], "regated_against" in kept) == ("3", "promoted", "2",
                                                                                                False)
    assert len(client.search_model_versions(f"name = '{name}'")) == 3


RACED_REGISTER = """
import sys
import mlflow
import stages.register as register
race = sys.argv[1]
gate, register_model = register.gate, mlflow.register_model
def gate_while_another_run_promotes(client, params, *args, **kwargs):
    result = gate(client, params, *args, **kwargs)
    if not getattr(gate_while_another_run_promotes, "done", False):
        gate_while_another_run_promotes.done = True
        client.set_registered_model_alias(params.register.model_name, "champion", "2")
    return result
def register_beside_another_run(model_uri, name, tags):
    register_model(model_uri, name, tags=tags)  # the other run's copy, a moment earlier
    return register_model(model_uri, name, tags=tags)
if race == "champion_moves":
    register.gate = gate_while_another_run_promotes
else:
    register.mlflow.register_model = register_beside_another_run
register.run_main(register.main)
"""


def test_a_champion_moved_by_another_run_while_gating_is_gated_against(registered: Path) -> None:
    """Two registers against one registry: the other run promotes version 2 while this one gates against version 1.
    This run gates again against version 2 before it moves any alias, and records that."""
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    name = read_json(root / "reports/registry.json")["model_name"]
    set_param(root, "register", "min_gain_over_champion", 0.5)
    run([sys.executable, "-m", "stages.register"], root)  # version 2, rejected: the version the other run promotes
    set_param(root, "register", "min_gain_over_champion", 0.001)  # a new key; a tie with either champion: rejected
    result = run([sys.executable, "-c", RACED_REGISTER, "champion_moves"], root)
    record = read_json(root / "reports/registry.json")
    assert "@champion of transfer-classifier moved from 1 to 2 while version 3 was gated" in result.stderr
    assert (record["version"], record["decision"], record["previous_champion"], record["champion"]) == (
        "3", "rejected", "2", "2")
    assert client.get_model_version(name, "3").tags["gate.previous_champion"] == "2"


def test_the_same_model_registered_by_two_runs_at_once_is_kept_once(registered: Path) -> None:
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    name = read_json(root / "reports/registry.json")["model_name"]
    set_param(root, "register", "min_gain_over_champion", -0.5)
    raced = run([sys.executable, "-c", RACED_REGISTER, "same_model"], root, check=False)
    assert raced.returncode == 1, raced.stderr[-2000:]  # retryable
    assert "another run registered this model, split and gate as version 2" in raced.stderr
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    run([sys.executable, "-m", "stages.register"], root)  # the retry finishes version 2 (the other run's)
    record = read_json(root / "reports/registry.json")
    assert (record["version"], record["decision"], record["champion"]) == ("2", "promoted", "2")
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]


INTERRUPTED_REGISTER = """
import sys
import stages.register as register
apply = register.apply_decision
def interrupted(*args, **kwargs):
    if sys.argv[1] == "after_aliases":
        apply(*args, **kwargs)
    raise RuntimeError("killed mid-registration")
register.apply_decision = interrupted
register.main()
"""


@pytest.mark.parametrize("cut", ["before_aliases", "after_aliases", "after_aliases_then_another_promoted"])
def test_a_registration_cut_short_is_finished_not_registered_twice(registered: Path, cut: str) -> None:
    """A register killed after its version exists, before or after the aliases moved: the retry finishes that
    version, gated against the champion it displaced (or, if another version took `@champion` since, against that
    one), and leaves no stray copy."""
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    name = read_json(root / "reports/registry.json")["model_name"]
    set_param(root, "register", "min_gain_over_champion", -0.5)  # a new key, and a candidate that gets promoted
    failed = run([sys.executable, "-c", INTERRUPTED_REGISTER, cut.removesuffix("_then_another_promoted")], root,
                 check=False)
    assert failed.returncode != 0 and "killed mid-registration" in failed.stderr
    assert "register.key" not in client.get_model_version(name, "2").tags
    champion_after_cut = "1" if cut == "before_aliases" else "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion_after_cut
    expected = {"version": "2", "previous_champion": champion_after_cut if cut == "before_aliases" else "1"}
    if cut == "after_aliases_then_another_promoted":
        set_param(root, "register", "min_gain_over_champion", -0.4)  # another key: version 3 takes @champion
        run([sys.executable, "-m", "stages.register"], root)
        assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
        set_param(root, "register", "min_gain_over_champion", -0.5)
        expected["previous_champion"] = "3"
    run([sys.executable, "-m", "stages.register"], root)
    finished = read_json(root / "reports/registry.json")
    assert finished["finished_after_interruption"] and finished["decision"] == "promoted"
    assert {k: finished[k] for k in expected} == expected
    versions = ["1", "2", "3"] if cut == "after_aliases_then_another_promoted" else ["1", "2"]
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == versions
    version = client.get_model_version(name, "2")
    assert version.tags["register.key"] and version.tags["gate.previous_champion"] == expected["previous_champion"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    run([sys.executable, "-m", "stages.register"], root)
    assert read_json(root / "reports/registry.json")["reused"]


def test_a_new_split_compares_the_champion_only_on_rows_new_to_it(registered: Path) -> None:
    """After the split changes, some of the new test rows were the champion's training rows: they do not count."""
    root = registered
    old = pd.read_parquet(root / "data/processed/splits.parquet")
    set_param(root, "preprocess", "seed", 1)
    run([sys.executable, "-m", "dvc", "repro", "register"], root)
    new = pd.read_parquet(root / "data/processed/splits.parquet")
    test = new[new["split"] == "test"]
    unseen = ~text_key(test["text"]).isin(text_key(old.loc[old["split"] != "test", "text"]))
    record = read_json(root / "reports/registry.json")
    assert record["previous_champion"] == "1" and record["version"] == "2"
    compared = record["champion_compared_on"]
    assert 0 < compared["rows"] == int(unseen.sum()) < compared["of_test_rows"] == len(test)
    assert any(f"on the {compared['rows']} of {len(test)} test rows the champion never trained on" in r
               for r in record["reasons"])
    predictions = pd.read_parquet(root / "models/predictions.parquet")
    candidate = predictions.loc[test.index[unseen.to_numpy()], ["candidate_p0", "candidate_p1"]].to_numpy()
    labels = test.loc[unseen, "label_id"].to_numpy()
    assert compared["candidate_accuracy"] == pytest.approx(float((candidate.argmax(axis=1) == labels).mean()))


def test_a_champion_that_no_longer_loads_is_a_clear_error(registered: Path) -> None:
    root = registered
    register = [sys.executable, "-m", "stages.register"]
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    champion = Path(unquote(urlparse(client.get_model_version_download_uri("transfer-classifier", "1")).path))
    saved = list(champion.rglob("ngram/ngram.json"))  # the champion's copy in MLflow's artifact store
    assert len(saved) == 1 and saved[0].is_relative_to(root)
    saved[0].write_text("{}")  # as if saved by code that wrote another format
    set_param(root, "register", "min_accuracy", 0.3)  # another gate: a new registration, which re-scores the champion
    result = run(register, root, check=False)
    assert result.returncode == 2
    assert "champion transfer-classifier@champion (version 1) does not load" in result.stderr
    assert "set_registered_model_alias" in result.stderr
    assert [str(v.version) for v in client.search_model_versions("name='transfer-classifier'")] == ["1"]  # nothing stray


def test_a_champion_of_other_labels_is_never_replaced(registered: Path) -> None:
    """Another task's data under the same registered name: the champion cannot score its test rows, so the gate
    would compare nothing (it once promoted the new task over the old one with 'champion accuracy 0.0')."""
    root = registered
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    data = pd.read_csv(root / "data" / "tiny_sentiment.csv")
    data["label"] = data["label"].map({"negative": "sad", "positive": "happy"})
    data.to_csv(root / "data" / "relabelled.csv", index=False)
    set_param(root, "data", "source", "data/relabelled.csv")
    set_param(root, "register", "min_gain_over_baseline", -1.0)  # the baseline check must not stop it first
    result = run([sys.executable, "-m", "dvc", "repro", "register"], root, check=False)
    assert result.returncode != 0
    assert ("the champion transfer-classifier@champion (version 1) predicts the labels ['negative', 'positive'], "
            "this candidate ['happy', 'sad']") in result.stderr
    assert "register.model_name" in result.stderr
    assert [str(v.version) for v in client.search_model_versions("name='transfer-classifier'")] == ["1"]
    set_param(root, "register", "model_name", "mood-classifier")  # its own name: registered and promoted there
    run([sys.executable, "-m", "dvc", "repro", "register"], root)
    record = read_json(root / "reports/registry.json")
    assert record["model_name"] == "mood-classifier" and record["decision"] == "promoted"
    assert str(client.get_model_version_by_alias("transfer-classifier", "champion").version) == "1"


def test_the_commit_is_dirty_only_for_changes_the_run_did_not_write(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: x\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: metrics/m.json\n"
                                       "    - path: metrics/café.json\n")
    (tmp_path / "studies" / "dvc.yaml").write_text("stages:\n  study:\n    cmd: x\n    wdir: ..\n")
    (tmp_path / "studies" / "dvc.lock").write_text("stages:\n  study:\n    outs:\n    - path: metrics/s.json\n")
    for name in ("metrics/m.json", "metrics/s.json", "code.py", "metrics/café.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("1")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    for name in ("dvc.lock", "metrics/m.json", "metrics/s.json", "metrics/café.json"):  # what a run rewrites
        (tmp_path / name).write_text((tmp_path / name).read_text() + "\n# rewritten\n")
    assert git_commit() == head
    (tmp_path / "code.py").write_text("2")
    assert git_commit() == f"{head}-dirty"


def test_the_projects_registry_is_the_one_dvc_names_even_from_a_temporary_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued or temporary `dvc exp run` runs the stage in a copy below .dvc/tmp/exps, with DVC_ROOT set to the
    project: the registry, and the artifacts of an experiment created there, belong to the project."""
    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmp1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_STAGE", "register")
    client = configure_mlflow()
    use_experiment("studies")
    assert (project / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    location = client.get_experiment_by_name("studies").artifact_location
    assert Path(location.removeprefix("file://")) == project / "mlruns" / "studies"
    monkeypatch.delenv("DVC_STAGE")  # a DVC_ROOT left in the environment outside a DVC stage is not followed
    assert project_registry() == f"sqlite:///{copy / 'mlflow.db'}"


def test_a_tracking_server_that_does_not_answer_fails_at_once_and_retryably(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RetryableError, match=r"tracking server http://127\.0\.0\.1:\d+ \(MLFLOW_TRACKING_URI\) does "
                                             r"not answer \(.*Failed to establish a new connection"):
        configure_mlflow()
