import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stages.config import Params
from stages.errors import PipelineError
from stages.fine_tune import fine_tune, pinned_to_features, training_metrics
from stages.hub import folder_fingerprint, resolve_backbone
from stages.model import HEAD_FILE, TextClassifier, read_info
from stages.model_files import encoder_path
from stages.preprocess import UNLABELED, preprocess
from tests.conftest import SERVED_ATOL, drop_labels, repo_cfg, self_training_on, with_blend

LABELS = ["negative", "positive"]


def _accuracy(predictions: pd.DataFrame, model: str) -> float:
    """Accuracy over every row not trained on (test + held-out domains: 160 rows, so chance is clearly ruled out)."""
    rows = predictions[predictions["split"].isin(["test", "heldout"])]
    return float((rows[[f"{model}_p0", f"{model}_p1"]].to_numpy().argmax(1) == rows["label_id"]).mean())


def test_linear_probe_beats_chance_and_saves_safetensors(tiny_params: Params, tiny_splits: tuple,
                                                         tiny_features: np.ndarray, tmp_path: Path) -> None:
    predictions, _, _ = fine_tune(tiny_params, tiny_splits[0], tiny_features, LABELS, tmp_path / "model")
    assert _accuracy(predictions, "candidate") >= 0.6
    assert _accuracy(predictions, "baseline") > 0.0  # the no-transfer baseline is always trained and scored
    assert set(load_file(str(tmp_path / "model" / HEAD_FILE))) == {"weight", "bias"}
    info = read_info(tmp_path / "model")
    assert info["strategy"] == "linear_probe" and info["params"]["fine_tune"]["seed"] == 0
    assert info["backbone_revision"] is None  # the default backbone: pinned by its package, not a hub commit


def test_the_encoder_is_pinned_to_the_commit_the_features_came_from(tiny_params: Params) -> None:
    """Features cached from an older commit of a hub backbone: LP-FT must load that commit, not today's `main`."""
    hub = tiny_params.model_copy(update={"backbone": tiny_params.backbone.model_copy(update={"name": "org/model"})})
    assert pinned_to_features(hub, {"backbone_revision": "a" * 40}).backbone.revision == "a" * 40
    assert pinned_to_features(tiny_params, {"backbone_revision": None}) is tiny_params
    with pytest.raises(PipelineError, match="extracted with backbone 'default' but backbone.name is 'org/model'"):
        pinned_to_features(hub, {"backbone": "default", "backbone_revision": None})


def test_a_changed_local_backbone_folder_is_refused_not_used(tiny_params: Params, tiny_splits: tuple,
                                                              tiny_features: np.ndarray, tmp_path: Path) -> None:
    """DVC does not look inside a backbone folder: features and a probe record its files' hash, and a stage that
    finds the folder changed stops instead of mixing a head fit on the old weights with the new ones."""
    folder = shutil.copytree(resolve_backbone("default"), tmp_path / "my-backbone")
    local = tiny_params.model_copy(update={"backbone": tiny_params.backbone.model_copy(update={"name": str(folder)})})
    fine_tune(local, tiny_splits[0], tiny_features, LABELS, tmp_path / "model")
    recorded = read_info(tmp_path / "model")["backbone_sha256"]
    assert recorded == folder_fingerprint(str(folder)) and encoder_path(tmp_path / "model") == str(folder)
    (folder / ".cache-note").write_text("hidden files are not the backbone's")
    assert pinned_to_features(local, {"backbone_sha256": recorded}) is local
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    with pytest.raises(PipelineError, match=f"backbone folder '{folder}' changed since the features in .* were made"):
        pinned_to_features(local, {"backbone_sha256": recorded})
    with pytest.raises(PipelineError, match="changed since the linear probe in .* run `dvc repro -f -s extract_feat"):
        encoder_path(tmp_path / "model")
    folder.rename(tmp_path / "moved")
    with pytest.raises(PipelineError, match=f"backbone folder '{folder}', which the linear probe .* is not there"):
        encoder_path(tmp_path / "model")


def test_saved_probe_reproduces_its_predictions(tiny_params: Params, tiny_splits: tuple, tiny_features: np.ndarray,
                                                tmp_path: Path) -> None:
    predictions, _, _ = fine_tune(tiny_params, tiny_splits[0], tiny_features, LABELS, tmp_path / "model")
    test = tiny_splits[0]["split"] == "test"
    reloaded = TextClassifier(tmp_path / "model").predict_proba(tiny_splits[0].loc[test, "text"].tolist())
    assert np.allclose(reloaded, predictions.loc[test, ["candidate_p0", "candidate_p1"]].to_numpy(), atol=SERVED_ATOL)


def test_finetune_trains_backbone_and_is_seeded(tiny_params: Params, tiny_splits: tuple, tiny_features: np.ndarray,
                                                tmp_path: Path) -> None:
    params = with_blend(tiny_params, [0.5])  # ngram/ is hashed too
    params = params.model_copy(update={"fine_tune": params.fine_tune.model_copy(update={"strategy": "finetune"})})
    first, record, timing = fine_tune(params, tiny_splits[0], tiny_features, LABELS, tmp_path / "a")
    second, _, _ = fine_tune(params, tiny_splits[0], tiny_features, LABELS, tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)  # same seed, same CPU run
    # ... and byte-identical model folders, so DVC's hash of the model (and every stage after it) stays put
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("ngram/ngram.json") in files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert _accuracy(first, "candidate") >= 0.6
    tuned = load_file(str(tmp_path / "a" / "encoder" / "model.safetensors"))
    original = load_file(str(Path(resolve_backbone("default")) / "model.safetensors"))
    changed = [k for k in tuned if k.endswith("layer.5.output.dense.weight")]
    assert changed and not torch.equal(tuned[changed[0]], next(v for k, v in original.items() if k.endswith(
        "layer.5.output.dense.weight")))  # the backbone itself was trained, not only the head
    saved = read_info(tmp_path / "a")["train"]
    assert len(saved["epochs"]) == 1 and not set(saved) & set(timing)  # no timing in the hashed folder
    assert timing["train_samples_per_second"] > 0 and timing["seconds"] > 0
    metrics = training_metrics(record)
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1
    assert metrics["val_accuracy"] == record["epochs"][0]["val_accuracy"]


def test_freezing_more_layers_than_exist_names_the_param(tiny_params: Params, tiny_splits: tuple,
                                                         tiny_features: np.ndarray, tmp_path: Path) -> None:
    ft = tiny_params.fine_tune
    params = tiny_params.model_copy(update={"fine_tune": ft.model_copy(update={
        "strategy": "finetune", "finetune": ft.finetune.model_copy(update={"freeze_layers": 9})})})
    with pytest.raises(PipelineError, match="fine_tune.finetune.freeze_layers is 9 but the backbone has 6"):
        fine_tune(params, tiny_splits[0], tiny_features, LABELS, tmp_path / "m")


def test_multiclass_labels(tiny_params: Params, tiny_frame: pd.DataFrame, tmp_path: Path) -> None:
    """Four classes (the domain as label): the head, the probabilities and the saved model all follow."""
    from stages.extract_features import extract_features
    from stages.preprocess import preprocess
    from tests.conftest import repo_cfg

    frame = tiny_frame.assign(label=tiny_frame["domain"], domain="all")
    splits, mapping, _ = preprocess(frame, repo_cfg("preprocess", train_domains=None, test_size=0.25, val_size=0.15))
    features, _ = extract_features(splits["text"].tolist(), tiny_params.backbone, tiny_params.extract_features,
                                   tiny_params.fine_tune.strategy)
    labels = list(mapping)
    predictions, _, _ = fine_tune(with_blend(tiny_params, [0.3]), splits, features, labels, tmp_path / "model")
    proba = predictions[[f"candidate_p{i}" for i in range(4)]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    test = (predictions["split"] == "test").to_numpy()
    assert (proba[test].argmax(1) == predictions.loc[test, "label_id"]).mean() > 0.4  # chance is 0.25
    served = TextClassifier(tmp_path / "model")
    assert served.labels == labels
    assert np.allclose(served.predict_proba(splits.loc[test, "text"].tolist()), proba[test], atol=SERVED_ATOL)


@pytest.mark.parametrize(("rows", "epochs", "min_steps", "expected"), [
    (7395, 1, 80, 1),   # every training row: 232 steps in one epoch
    (128, 1, 80, 20),   # 64 per class: 4 steps per epoch
    (1024, 3, 80, 3),   # epochs already give more than min_steps
    (32, 1, 0, 1),
])
def test_few_shot_runs_get_at_least_min_steps(rows: int, epochs: int, min_steps: int, expected: int) -> None:
    from stages.finetune_loop import training_epochs
    from tests.conftest import repo_cfg

    cfg = repo_cfg("fine_tune").finetune.model_copy(update={"epochs": epochs, "min_steps": min_steps, "batch_size": 32})
    assert training_epochs(cfg, rows) == expected


def test_finetune_val_scores_come_from_the_saved_model(tiny_params: Params, tiny_splits: tuple,
                                                       tiny_features: np.ndarray, tmp_path: Path) -> None:
    """Validation rows are scored once, inside the training loop; those scores must be the kept epoch's, i.e. what
    the saved model predicts for them, and so must the test rows' scores."""
    ft = with_blend(tiny_params, [0.3]).fine_tune
    params = tiny_params.model_copy(update={"fine_tune": ft.model_copy(update={
        "strategy": "finetune", "finetune": ft.finetune.model_copy(update={"epochs": 2, "patience": 2})})})
    predictions, _, _ = fine_tune(params, tiny_splits[0], tiny_features, LABELS, tmp_path / "model")
    reloaded = TextClassifier(tmp_path / "model")
    train = read_info(tmp_path / "model")["train"]
    assert len(train["epochs"]) == 2
    if not torch.cuda.is_available():  # on CPU the trajectory is known: the restored epoch is not the last one
        assert train["best_epoch"] == 1
    for split in ("val", "test"):
        rows = tiny_splits[0]["split"] == split
        expected = reloaded.predict_proba(tiny_splits[0].loc[rows, "text"].tolist())
        assert np.allclose(expected, predictions.loc[rows, ["candidate_p0", "candidate_p1"]].to_numpy(), atol=SERVED_ATOL)


def few_shot_with_unlabeled(frame: pd.DataFrame, tiny_splits: tuple,
                            tiny_features: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """8 labelled movie rows per class, the other movie training rows kept as unlabelled text, and their features."""
    splits, _, _ = preprocess(frame, repo_cfg("preprocess", train_domains=["movie"], test_size=0.25, val_size=0.15,
                                           n_per_class=8, keep_unlabeled=True))
    by_text = dict(zip(tiny_splits[0]["text"], tiny_features))  # the same texts, so the same features
    return splits, np.stack([by_text[t] for t in splits["text"]])


def test_self_training_trains_on_unlabeled_text(tiny_params: Params, tiny_frame: pd.DataFrame, tiny_splits: tuple,
                                                 tiny_features: np.ndarray, tmp_path: Path,
                                                 trained_texts: list[str]) -> None:
    splits, features = few_shot_with_unlabeled(tiny_frame, tiny_splits, tiny_features)
    splits = drop_labels(splits, splits.index[splits["domain"] == "nyt"][:6])  # a held-out domain's text: adapt's
    _, record, _ = fine_tune(self_training_on(tiny_params), splits, features, LABELS, tmp_path / "a")
    unlabeled = (splits["split"] == UNLABELED) & (splits["domain"] == "movie")
    pool, labelled = set(splits.loc[unlabeled, "text"]), set(splits.loc[splits["split"] == "train", "text"])
    trained = set(trained_texts)
    assert labelled <= trained and trained & pool and trained <= labelled | pool
    assert 0 < record["pseudo_labelled"] <= len(pool) and 0 < record["lpft_val_accuracy"] <= 1
    assert (splits.loc[unlabeled, "label_id"] == -1).all()  # the pool has no labels to read


def test_each_self_training_round_relabels_with_the_model_the_last_round_trained(
        tiny_params: Params, tiny_frame: pd.DataFrame, tiny_splits: tuple, tiny_features: np.ndarray, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import finetune_loop, self_training

    splits, features = few_shot_with_unlabeled(tiny_frame, tiny_splits, tiny_features)
    labellings: list[np.ndarray] = []
    trained: list[tuple[list[str], np.ndarray]] = []
    real_classify, real_finetune = self_training.classify, finetune_loop.finetune

    def classify_spy(*args: object) -> np.ndarray:
        labellings.append(real_classify(*args))
        return labellings[-1]

    def finetune_spy(encoder, tokenizer, head, cfg, train, val, seed):
        trained.append((list(train[0]), np.asarray(train[1])))
        return real_finetune(encoder, tokenizer, head, cfg, train, val, seed)

    monkeypatch.setattr(self_training, "classify", classify_spy)
    monkeypatch.setattr(finetune_loop, "finetune", finetune_spy)
    params = self_training_on(tiny_params)  # confidence 0: every pool row is kept, class-balanced
    st = params.fine_tune.self_training.model_copy(update={"rounds": 2})
    params = params.model_copy(update={"fine_tune": params.fine_tune.model_copy(update={"self_training": st})})
    fine_tune(params, splits, features, LABELS, tmp_path / "model")

    assert len(labellings) == 2 and len(trained) == 3  # LP-FT, then one training pass per round
    n_labelled = int((splits["split"] == "train").sum())
    for labelling, (_, labels) in zip(labellings, trained[1:]):
        assert np.array_equal(labels[n_labelled:], self_training.pseudo_label(labelling, 0.0)[1])
    assert not np.allclose(labellings[0], labellings[1], atol=1e-3)  # round 1's training changed the labeller
