from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import adapt
from stages.adapt import (
    BARS_CSV,
    PER_DOMAIN_CSV,
    PLOT_PNG,
    POINTS_CSV,
    check_domains,
    draw_target,
    log_adaptation,
    main,
    run_adaptation,
    summarize,
)
from stages.config import Params
from stages.errors import PipelineError
from stages.io import read_json
from stages.registry import tracking_uri
from stages.self_training import pseudo_label
from tests.conftest import drop_labels, registry_client


def test_shots_pool_and_scored_rows_never_overlap(tiny_params: Params, tiny_splits: tuple) -> None:
    domain = tiny_splits[0][tiny_splits[0]["domain"] == "amazon"]
    target = draw_target(domain, tiny_params.adapt, 0, "amazon")
    assert target.shots["label"].value_counts().to_dict() == {"negative": 4, "positive": 4}
    parts = [set(target.shots.index), set(target.pool.index), set(target.scored.index)]
    assert sum(map(len, parts)) == len(domain) and set().union(*parts) == set(domain.index)
    assert len(target.pool) == round(tiny_params.adapt.unlabeled_fraction * (len(domain) - 8))
    assert "label_id" not in target.pool and "label" not in target.pool  # the pool's labels are never read
    assert draw_target(domain, tiny_params.adapt, 0, "amazon").scored.index.equals(target.scored.index)


def test_too_few_target_rows_names_the_domain_and_param(tiny_params: Params, tiny_splits: tuple) -> None:
    domain = tiny_splits[0][tiny_splits[0]["domain"] == "nyt"]
    with pytest.raises(PipelineError, match=r"domain 'nyt' .*adapt\.labels_per_class=500"):
        draw_target(domain, tiny_params.adapt.model_copy(update={"labels_per_class": 500}), 0, "nyt")


def test_pseudo_labels_are_confident_and_class_balanced() -> None:
    proba = np.array([[0.95, 0.05], [0.99, 0.01], [0.6, 0.4], [0.1, 0.9], [0.2, 0.8], [0.97, 0.03]])
    rows, labels = pseudo_label(proba, 0.85)
    # class 1 has one confident row (3), so class 0 keeps only its most confident one (1)
    assert rows.tolist() == [1, 3] and labels.tolist() == [0, 1]
    assert len(pseudo_label(proba, 0.999)[0]) == 0


def test_adaptation_scores_every_heldout_domain_on_unseen_rows(tiny_params: Params, trained: tuple,
                                                               trained_texts: list[str]) -> None:
    splits, predictions = trained  # a linear-probe candidate: only adaptation (shots, self-training) trains below
    points = run_adaptation(tiny_params, splits, predictions)
    scored, unblended = set(), []
    for name, domain in splits[splits["split"] == "heldout"].groupby("domain"):
        rows = adapt.draw_target(domain, tiny_params.adapt, 0, str(name)).scored
        scored |= set(rows["text"])
        proba = predictions.loc[rows.index, ["unblended_p0", "unblended_p1"]].to_numpy()
        unblended.append(float((proba.argmax(axis=1) == rows["label_id"].to_numpy()).mean()))
    assert trained_texts and not scored & set(trained_texts)  # nothing that is scored was ever trained on
    sizes = splits[splits["split"] == "heldout"].groupby("domain").size()
    assert points["domain"].tolist() == ["amazon", "nyt", "tweets"]
    assert (points["shots"] == 8).all()
    assert (points["scored_rows"] + points["unlabeled_rows"] + 8 == sizes[points["domain"]].to_numpy()).all()
    assert ((points["pseudo_labelled"] > 0) & (points["pseudo_labelled"] <= points["unlabeled_rows"])).all()
    heldout = (predictions["split"] == "heldout").to_numpy()
    assert not np.allclose(predictions.loc[heldout, "candidate_p1"], predictions.loc[heldout, "unblended_p1"])
    assert points["unadapted_accuracy"].tolist() == unblended  # the model adapt trains, without fine_tune's blend
    rest_unadapted = points["unadapted_accuracy"]
    assert ((rest_unadapted > 0) & (rest_unadapted < 1)).all()
    assert np.allclose(points["gain"], points["adapted_accuracy"] - points["unadapted_accuracy"])


def test_a_domains_own_unlabelled_rows_are_its_self_training_pool(tiny_params: Params, trained: tuple,
                                                                  trained_texts: list[str]) -> None:
    splits, predictions = trained
    amazon = splits[(splits["domain"] == "amazon") & (splits["split"] == "heldout")]
    own = amazon.sample(12, random_state=0).index  # these lose their labels: the source gave amazon text only
    splits = drop_labels(splits, own)
    params = tiny_params.model_copy(update={"adapt": tiny_params.adapt.model_copy(update={"unlabeled_fraction": 0.0})})
    points = run_adaptation(params, splits, predictions).set_index("domain")
    assert points.loc["amazon", "unlabeled_rows"] == 12 and 0 < points.loc["amazon", "pseudo_labelled"] <= 12
    assert set(splits.loc[own, "text"]) & set(trained_texts)
    for name in ("nyt", "tweets"):  # no text of their own and no rows held back: shots only
        assert points.loc[name, "unlabeled_rows"] == 0 and points.loc[name, "pseudo_labelled"] == 0
        assert points.loc[name, "adapted_accuracy"] == points.loc[name, "shots_only_accuracy"]


def test_negative_transfer_stays_visible() -> None:
    points = pd.DataFrame({"domain": ["a", "a", "b"], "seed": [0, 1, 0], "unadapted_accuracy": [0.8, 0.8, 0.6],
                           "shots_only_accuracy": [0.75, 0.78, 0.65], "adapted_accuracy": [0.7, 0.76, 0.7],
                           "baseline_accuracy": 0.5, "majority_accuracy": 0.5})
    points["gain"] = points["adapted_accuracy"] - points["unadapted_accuracy"]
    points["self_training_gain"] = points["adapted_accuracy"] - points["shots_only_accuracy"]
    per_domain = summarize(points).set_index("domain")
    assert per_domain.loc["a", "negative_transfer"] and not per_domain.loc["b", "negative_transfer"]
    assert per_domain.loc["a", "gain"] == pytest.approx(-0.07)
    assert per_domain.loc["a", "self_training_negative"] and not per_domain.loc["b", "self_training_negative"]


def test_no_heldout_domain_is_a_clear_error(tiny_params: Params, trained: tuple) -> None:
    splits, predictions = trained
    with pytest.raises(PipelineError, match="no held-out domain"):
        run_adaptation(tiny_params, splits[splits["split"] != "heldout"], predictions)


def test_stage_writes_report_metrics_and_an_mlflow_run(tiny_params: Params, trained: tuple) -> None:
    main()
    folder = tiny_params.paths.adaptation
    assert {p.name for p in folder.iterdir()} == {POINTS_CSV, PER_DOMAIN_CSV, BARS_CSV, PLOT_PNG}
    metrics = read_json(tiny_params.paths.adaptation_metrics)
    assert set(metrics) == {"amazon", "nyt", "tweets"}
    assert all(isinstance(m["negative_transfer"], bool) for m in metrics.values())
    client = registry_client(tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(tiny_params.register.experiment).experiment_id])[0]
    assert run.data.tags["pipeline.stage"] == "adapt"
    assert run.data.metrics["tweets.adapted_accuracy"] == pytest.approx(metrics["tweets"]["adapted_accuracy"])
    assert Path(folder / PLOT_PNG).stat().st_size > 0
    bars = pd.read_csv(folder / BARS_CSV).set_index("bar")["accuracy"]  # what `dvc plots` draws: every bar
    assert len(bars) == 3 * 4  # baseline, unadapted, shots only, self-trained (tiny_params self-trains)
    assert bars["nyt: transferred, unadapted"] == pytest.approx(metrics["nyt"]["unadapted_accuracy"], abs=1e-4)
    assert bars["nyt: + few-shot adaptation"] == pytest.approx(metrics["nyt"]["shots_only_accuracy"], abs=1e-4)


def test_every_domain_too_small_is_named_before_any_training(tiny_splits: tuple) -> None:
    heldout = tiny_splits[0][tiny_splits[0]["split"] == "heldout"]
    with pytest.raises(PipelineError, match=r"domain\(s\) \['amazon', 'nyt', 'tweets'\] have too few rows per label "
                                            r".*adapt\.labels_per_class=500"):
        check_domains(heldout, 500, {0: "negative", 1: "positive"})


def test_a_domain_without_some_class_is_named(tiny_splits: tuple, caplog: pytest.LogCaptureFixture) -> None:
    heldout = tiny_splits[0][tiny_splits[0]["split"] == "heldout"]
    one_sided = heldout[(heldout["domain"] != "nyt") | (heldout["label"] == "positive")]
    with caplog.at_level("WARNING", logger="stages"):
        check_domains(one_sided, 2, {0: "negative", 1: "positive"})
    assert "held-out domain 'nyt' has no row of class(es) ['negative']" in caplog.text
    assert "'amazon'" not in caplog.text


def test_any_domain_name_and_negative_transfer_reach_mlflow(tiny_params: Params, tmp_path: Path) -> None:
    points = pd.DataFrame({"domain": ["Amazon \u2713 (r\u00e9views), & co", "/r/movies//old..new"], "seed": [0, 0],
                           "unadapted_accuracy": [0.8, 0.8], "shots_only_accuracy": [0.7, 0.9],
                           "adapted_accuracy": [0.7, 0.9], "gain": [-0.1, 0.1], "self_training_gain": [0.0, 0.0],
                           "baseline_accuracy": [0.6, 0.6], "majority_accuracy": [0.5, 0.5]})
    folder = tmp_path / "adaptation"
    folder.mkdir()
    run_id = log_adaptation(tiny_params, summarize(points), folder)
    metrics = registry_client(tracking_uri()).get_run(run_id).data.metrics
    assert metrics["Amazon _ _r\u00e9views__ _ co.negative_transfer"] == 1.0
    assert metrics["Amazon _ _r\u00e9views__ _ co.gain"] == pytest.approx(-0.1)
    assert metrics["r/movies/old__new.gain"] == pytest.approx(0.1)
