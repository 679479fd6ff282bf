"""studies/dvc.yaml end to end: the data-efficiency curve and domain adaptation run downstream of the main DAG."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from flows.dag import read_dag
from stages.io import read_json
from tests.conftest import ROOT, copy_project, run

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
STUDIES = ["studies/dvc.yaml:data_efficiency", "studies/dvc.yaml:adapt"]


@pytest.fixture(scope="module")
def studied(pipeline_project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the pipeline project with studies/dvc.yaml added, after `dvc repro studies/dvc.yaml`."""
    root = tmp_path_factory.mktemp("studies") / "project"
    copy_project(pipeline_project, root)
    shutil.copytree(ROOT / "studies", root / "studies", ignore=shutil.ignore_patterns("dvc.lock"))
    return root, run([*DVC, "repro", "studies/dvc.yaml"], root).stdout


def test_studies_run_after_the_main_dag_without_rerunning_it(studied: tuple[Path, str]) -> None:
    root, output = studied
    assert [s for s in STUDIES if f"Running stage '{s}'" in output] == STUDIES
    assert "Running stage 'fine_tune'" not in output and "Running stage 'extract_features'" not in output
    curve = read_json(root / "metrics/data_efficiency.json")
    assert list(curve["budgets"])[:2] == ["4", "8"] and curve["strategy"] == "linear_probe"
    assert set(read_json(root / "metrics/adaptation.json")) == {"amazon", "nyt", "tweets"}


def test_plain_repro_leaves_studies_alone_and_rerun_is_a_noop(studied: tuple[Path, str]) -> None:
    root, _ = studied
    for target in ([], ["studies/dvc.yaml"]):
        result = run([*DVC, "repro", *target], root)
        assert "Running stage" not in result.stdout, result.stdout


def test_curve_shows_in_dvc_metrics_and_plots(studied: tuple[Path, str]) -> None:
    root, _ = studied
    metrics = json.dumps(json.loads(run([*DVC, "metrics", "show", "--json"], root).stdout))
    assert "transfer_accuracy" in metrics and "adapted_accuracy" in metrics
    plots = json.loads(run([*DVC, "plots", "show", "--json"], root).stdout)
    assert "errors" not in plots, plots
    shown = json.dumps(plots["data"])
    assert "baseline_accuracy" in shown and "transfer_accuracy" in shown
    curve, = plots["data"]["data_efficiency"]
    assert curve["content"]["encoding"]["x"]["scale"]["type"] == "log"  # budgets 16 to thousands, evenly spaced
    bars = {row["bar"] for row in plots["data"]["adaptation"][0]["content"]["data"]["values"]}
    assert {"nyt: no-transfer baseline (source rows only)", "nyt: transferred, unadapted"} <= bars


def test_prefect_dag_adds_studies_only_when_asked(studied: tuple[Path, str]) -> None:
    root, _ = studied
    assert not any(s.name in STUDIES for s in read_dag(root))
    names = [s.name for s in read_dag(root, studies=True)]
    assert set(STUDIES) <= set(names)
    assert names.index(STUDIES[1]) > names.index("fine_tune") and names.index(STUDIES[0]) > names.index(
        "extract_features")
