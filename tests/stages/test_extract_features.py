import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from benchmarks.ort_fusions import kernel_seconds
from stages.backbone import (
    CHARS_PER_TOKEN,
    clip,
    embed,
    for_each_batch,
    load_encoder,
    load_tokenizer,
    pad_batch,
    select_device,
    tokenize,
)
from stages.config import BackboneConfig, ExtractConfig
from stages.errors import PipelineError
from stages.extract_features import extract_features, resolve_runtime
from stages.hub import hub_commit, resolve_backbone
from stages.onnx_runtime import INPUTS, export, onnx_forward, quantize, session
from tests.conftest import ROOT, repo_cfg


def test_shape_and_unit_norm(tiny_splits: tuple[pd.DataFrame, dict], tiny_features: np.ndarray) -> None:
    assert tiny_features.shape == (len(tiny_splits[0]), 384)
    assert np.allclose(np.linalg.norm(tiny_features, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_exact_runtimes_match_sentence_transformers(tiny_splits: tuple[pd.DataFrame, dict], runtime: str) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = tiny_splits[0]["text"].tolist()[:48]
    reference = sentence_transformers.SentenceTransformer(resolve_backbone("default"), device="cpu").encode(texts)
    cfg = repo_cfg("extract_features", batch_size=16, runtime=runtime, precision="fp32")
    ours, meta = extract_features(texts, repo_cfg("backbone", max_length=256), cfg, "linear_probe")
    assert (meta["runtime"], meta["precision"]) == (runtime, "fp32")
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999


def test_int8_onnx_is_close_to_fp32(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    texts = tiny_splits[0]["text"].tolist()[:64]
    backbone = repo_cfg("backbone", max_length=64)
    int8_cfg = repo_cfg("extract_features", runtime="auto", precision="int8")
    int8, meta = extract_features(texts, backbone, int8_cfg, "linear_probe")
    fp32, _ = extract_features(texts, backbone, repo_cfg("extract_features", runtime="torch", precision="fp32"),
                               "linear_probe")
    assert (meta["runtime"], meta["precision"]) == ("onnxruntime", "int8")
    cosine = (int8 * fp32).sum(axis=1)
    assert cosine.mean() > 0.97 and not np.allclose(cosine, 1.0, atol=1e-4)  # close, and really quantized


@pytest.mark.parametrize(("runtime", "precision", "device", "strategy", "expected"), [
    ("auto", "auto", "cpu", "finetune", ("onnxruntime", "int8")),   # features only start LP-FT; no AMX
    ("auto", "auto", "cpu", "linear_probe", ("torch", "auto")),      # the served probe reads them: exact
    ("auto", "auto", "cuda", "finetune", ("torch", "auto")),
    ("auto", "fp32", "cpu", "finetune", ("torch", "fp32")),
    ("auto", "bf16", "cpu", "finetune", ("torch", "bf16")),
    ("auto", "int8", "cuda", "linear_probe", ("onnxruntime", "int8")),
    ("torch", "auto", "cpu", "finetune", ("torch", "auto")),
    ("onnxruntime", "auto", "cpu", "linear_probe", ("onnxruntime", "int8")),
    ("onnxruntime", "fp32", "cpu", "finetune", ("onnxruntime", "fp32")),
])
def test_runtime_resolution(runtime: str, precision: str, device: str, strategy: str,
                            expected: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stages.extract_features.amx_cpu", lambda: False)
    cfg = repo_cfg("extract_features", runtime=runtime, precision=precision)
    assert resolve_runtime(cfg, torch.device(device), strategy) == expected


@pytest.mark.parametrize("runtime", ["auto", "onnxruntime"])
def test_a_backbone_onnx_cannot_run_falls_back_to_torch_only_under_auto(monkeypatch: pytest.MonkeyPatch,
                                                                       runtime: str) -> None:
    def cannot(*_: object) -> None:
        raise PipelineError("the exported backbone differs from torch by 1.00e+00 on a padded batch")

    monkeypatch.setattr("stages.extract_features.onnx_forward", cannot)
    monkeypatch.setattr("stages.extract_features.amx_cpu", lambda: False)
    cfg = repo_cfg("extract_features", runtime=runtime, precision="auto" if runtime == "auto" else "int8")
    args = (["a fine film", "a dull one"], repo_cfg("backbone"), cfg, "finetune")
    if runtime == "onnxruntime":  # asked for by name: the error stands
        with pytest.raises(PipelineError, match="differs from torch"):
            extract_features(*args)
        return
    vectors, meta = extract_features(*args)
    assert (meta["runtime"], meta["precision"]) == ("torch", "fp32") and vectors.shape == (2, 384)


def test_auto_takes_bf16_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stages.extract_features.amx_cpu", lambda: True)
    cfg = repo_cfg("extract_features", runtime="auto", precision="auto")
    assert resolve_runtime(cfg, torch.device("cpu"), "finetune") == ("torch", "bf16")
    assert resolve_runtime(cfg, torch.device("cpu"), "linear_probe") == ("torch", "auto")


@pytest.mark.parametrize(("runtime", "precision"), [("torch", "int8"), ("onnxruntime", "bf16")])
def test_precision_that_the_runtime_lacks_is_rejected(runtime: str, precision: str) -> None:
    with pytest.raises(ValidationError, match=f"precision {precision} needs runtime"):
        ExtractConfig(batch_size=8, runtime=runtime, precision=precision)


def test_bucketing_keeps_input_order() -> None:
    tokenizer, model = load_encoder("default", select_device())
    texts = ["short", "a much longer sentence about a film that goes on and on", "mid length text"]
    together = embed(texts, tokenizer, model, max_length=64, batch_size=2, precision="fp32")
    one_by_one = np.vstack([embed([t], tokenizer, model, max_length=64, batch_size=1, precision="fp32") for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_bf16_is_close_to_fp32(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    texts, backbone = tiny_splits[0]["text"].tolist()[:32], repo_cfg("backbone", max_length=64)
    bf16, meta = extract_features(texts, backbone, repo_cfg("extract_features", precision="bf16"), "linear_probe")
    fp32, _ = extract_features(texts, backbone, repo_cfg("extract_features", precision="fp32"), "linear_probe")
    assert (meta["runtime"], meta["precision"]) == ("torch", "bf16")
    assert ((bf16 * fp32).sum(axis=1)).min() > 0.99


@pytest.mark.parametrize("offline", ["1", "true"])
def test_unknown_backbone_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, offline: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(PipelineError, match="backbone.name 'no/such-model' .* not in the Hugging Face cache"):
        resolve_backbone("no/such-model")


HUB_CHECK = """
import json, sys
from pathlib import Path
from stages.hub import resolve_backbone
from stages.config import BackboneConfig, ExtractConfig
from stages.extract_features import extract_features
from stages.model_files import encoder_path, write_info
from tests.conftest import repo_cfg
_, meta = extract_features(["a fine film", "dull"], BackboneConfig(name="example/minilm", max_length=32),
                           repo_cfg("extract_features", precision="fp32"), "linear_probe")
probe = Path(sys.argv[1])
write_info(probe, {"backbone": "example/minilm", "backbone_revision": sys.argv[2]})
print(json.dumps({"main": resolve_backbone("example/minilm"), "pinned": resolve_backbone("example/minilm", sys.argv[2]),
                  "recorded": meta["backbone_revision"], "probe_runs": encoder_path(probe)}))
"""


def test_a_hub_backbone_resolves_offline_and_its_commit_is_recorded_and_reloaded(tmp_path: Path) -> None:
    """A hub backbone a user fetched once runs offline at the commit `main` points to; the features record that
    commit, and a linear probe trained on an older commit keeps running it after `main` moved on."""
    old, new = "0" * 40, "1" * 40
    repo = tmp_path / "hub" / "models--example--minilm"
    for commit in (old, new):
        shutil.copytree(resolve_backbone("default"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    (tmp_path / "probe").mkdir()
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", HUB_CHECK, str(tmp_path / "probe"), old], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"main": str(repo / "snapshots" / new), "pinned": str(repo / "snapshots" / old),
                    "recorded": new, "probe_runs": str(repo / "snapshots" / old)}


def test_only_a_hub_id_records_a_commit(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert hub_commit("org/model", str(snapshot)) == "a" * 40
    assert hub_commit(str(snapshot), str(snapshot)) is None  # a local folder, even one inside a hub cache
    assert hub_commit("default", resolve_backbone("default")) is None


def test_a_revision_for_the_default_or_a_local_backbone_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="backbone.revision 'v2' applies to a hub id"):
        resolve_backbone(str(tmp_path), "v2")
    with pytest.raises(ValidationError, match="revision applies to a hub id only"):
        BackboneConfig(name="default", revision="v2", max_length=32)


def test_a_backbone_folder_with_only_pickled_weights_is_refused_not_unpickled(tmp_path: Path) -> None:
    _, model = load_encoder("default", torch.device("cpu"))
    folder = tmp_path / "my-backbone"
    model.save_pretrained(folder)
    load_tokenizer("default").save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PipelineError, match=r"has no \*\.safetensors weights \(it has pytorch_model\.bin, pickled"):
        load_encoder(str(folder), torch.device("cpu"))
    model.save_pretrained(folder)  # the same weights as safetensors load
    _, loaded = load_encoder(str(folder), torch.device("cpu"))
    assert torch.equal(loaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("backbones") / "saved"
    load_encoder("default", torch.device("cpu"))[1].save_pretrained(folder)
    load_tokenizer("default").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("remove", "message"), [
    ("config.json", "has no config.json"),
    ("tokenizer*", r"has no tokenizer \(none of tokenizer.json, vocab.txt"),  # transformers would make an all-[UNK] one
])
def test_a_backbone_folder_without_config_or_tokenizer_is_a_clear_error(saved_backbone: Path, tmp_path: Path,
                                                                       remove: str, message: str) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / "broken")
    for path in folder.glob(remove):
        path.unlink()
    with pytest.raises(PipelineError, match=f"backbone.name '{folder}': {folder} {message}"):
        load_encoder(str(folder), torch.device("cpu"))


@pytest.mark.parametrize("route", ["index", "config"])
def test_pickled_weights_a_config_or_index_names_are_never_unpickled(saved_backbone: Path, tmp_path: Path,
                                                                     route: str) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / "sneaky")
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "weights.bin")
    if route == "index":  # a safetensors file is there, but the index sends every weight to the pickle
        (folder / "model.safetensors").rename(folder / "unused.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict.fromkeys(state, "weights.bin")}))
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "weights.bin"}))
    # transformers itself refuses a config's pickle when asked for safetensors; the index it would follow
    refused = r"would unpickle .*weights\.bin" if route == "index" else r"neither a safetensors file .*weights\.bin"
    with pytest.raises(PipelineError, match=refused):
        load_encoder(str(folder), torch.device("cpu"))


def test_corrupt_safetensors_weights_are_a_clear_error(saved_backbone: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=f"cannot load a model from {folder}"):
        load_encoder(str(folder), torch.device("cpu"))


REMOTE_CODE = """import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("custom code ran")
from transformers import BertConfig, BertModel
class EvilConfig(BertConfig):
    model_type = "evilbert"
class EvilModel(BertModel):
    config_class = EvilConfig
"""


@pytest.mark.parametrize("model_type", ["evilbert", "bert"])
def test_custom_code_a_backbone_config_names_is_never_run(saved_backbone: Path, tmp_path: Path, model_type: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / "custom")
    (folder / "modeling_evil.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": model_type,
               "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    if model_type == "bert":  # a built-in type loads as that type, without the custom code, and says so
        with caplog.at_level("WARNING", logger="stages"):
            assert type(load_encoder(str(folder), torch.device("cpu"))[1]).__name__ == "BertModel"
        assert "auto_map (custom code) is ignored; loaded as the built-in BertModel" in caplog.text
    else:
        with pytest.raises(PipelineError, match=r"cannot load .* needs custom code \(config.json.s auto_map\), which is never run"):
            load_encoder(str(folder), torch.device("cpu"))
    assert not (folder / "RAN").exists()


@pytest.mark.parametrize("change", ["ddp_prefix", "more_layers"])
def test_weights_that_do_not_fit_the_config_are_refused_not_drawn_at_random(saved_backbone: Path, tmp_path: Path,
                                                                           change: str) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / change)
    if change == "ddp_prefix":  # what a DistributedDataParallel training script saves
        state = load_file(str(folder / "model.safetensors"))
        save_file({f"module.{k}": v for k, v in state.items()}, str(folder / "model.safetensors"))
        message = r"\d+ weights are missing, e\.g\. .*; the files hold \d+ weights under other names, e\.g\. module\."
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 8}))
        message = r"weights are missing, e\.g\. encoder\.layer\.[67]\."
    with pytest.raises(PipelineError, match=f"the weights in {folder} do not fit its config.json .*{message}"):
        load_encoder(str(folder), torch.device("cpu"))


def test_a_checkpoint_without_the_unused_pooler_loads(saved_backbone: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved_backbone, tmp_path / "no_pooler")
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, str(folder / "model.safetensors"))
    texts = ["a fine film", "a dull one"]
    ours = embed(texts, *load_encoder(str(folder), torch.device("cpu")), max_length=32, batch_size=2)
    reference = embed(texts, *load_encoder(str(saved_backbone), torch.device("cpu")), max_length=32, batch_size=2)
    assert np.allclose(ours, reference, atol=1e-6)


def test_long_texts_are_cut_before_tokenizing_to_the_same_ids() -> None:
    tokenizer = load_tokenizer("default")
    long = "A slow, beautiful film about memory; the  actors\nare superb. " * 2000  # 120k characters
    sparse = "a" + "\n" * 9000 + " words at the end"  # its first characters hold too few tokens: kept whole
    texts = [long, "x" * 50_000, sparse, "short"]  # the second has no space to cut at
    for length in (16, 128):
        assert tokenize(tokenizer, texts, length)["input_ids"] == \
            tokenizer(texts, truncation=True, max_length=length)["input_ids"]
    assert len(clip(long, tokenizer, 128)) < 128 * CHARS_PER_TOKEN and clip(sparse, tokenizer, 128) == sparse
    tokenizer.truncation_side = "left"  # truncation keeps the end of the text: never cut
    assert clip(long, tokenizer, 128) == long


def test_long_documents_are_truncated_not_rejected() -> None:
    tokenizer, model = load_encoder("default", select_device())
    long_text = "a remarkably long review that keeps going " * 2000
    vectors = embed([long_text, "short"], tokenizer, model, max_length=128, batch_size=2)
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_equals_the_tokenizers_own_padding(side: str) -> None:
    tokenizer = load_tokenizer("default")
    tokenizer.padding_side = side
    ids = tokenizer(["short", "a much longer sentence about a film", "mid length text"])["input_ids"]
    rows = [2, 0, 1]
    ours = pad_batch(ids, rows, tokenizer, torch.device("cpu"))
    theirs = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])
    assert not torch.equal(ours["attention_mask"][:, 0], ours["attention_mask"][:, -1])  # really padded


def test_batch_parallel_embedding_equals_the_sequential_one(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    texts = tiny_splits[0]["text"].tolist()[:40]
    tokenizer, model = load_encoder("default", torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = embed(texts, tokenizer, model, max_length=64, batch_size=8)
        assert torch.get_num_threads() == 2  # the batch threads' one intra-op thread each is undone
        torch.set_num_threads(1)
        sequential = embed(texts, tokenizer, model, max_length=64, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(parallel, sequential, atol=1e-5)
    assert np.abs(parallel).sum(axis=1).min() > 0  # every row written


def test_onnx_batches_in_parallel_equal_one_at_a_time(tiny_splits: tuple[pd.DataFrame, dict]) -> None:
    texts = tiny_splits[0]["text"].tolist()[:40]
    tokenizer, model = load_encoder("default", torch.device("cpu"))
    onnx = onnx_forward(model, tokenizer, "int8")
    calls, together = itertools.count(), threading.Barrier(2, timeout=60)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert threading.current_thread().name.startswith("batch")
        if next(calls) < 2:
            together.wait()  # times out (BrokenBarrierError) unless two batches are in flight at once
        return onnx(batch)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = embed(texts, tokenizer, model, max_length=64, batch_size=8, precision="fp32", forward=forward)
        torch.set_num_threads(1)
        sequential = embed(texts, tokenizer, model, max_length=64, batch_size=8, precision="fp32", forward=onnx)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(parallel, sequential, atol=1e-6)
    assert np.abs(parallel).sum(axis=1).min() > 0  # every row written


def test_onnx_keeps_add_and_layer_norm_unfused(tmp_path: Path) -> None:
    # ORT's SkipLayerNormalization ran 3-6x slower on CPU than the pair it replaces (benchmarks.ort_fusions): by
    # default neither the exported graph nor the session's own optimizer fuses them, in fp32 or int8; fused on request
    # (which shows the check can see a fused graph: ORT ignores a misspelt name in disabled_optimizers)
    tokenizer, model = load_encoder("default", torch.device("cpu"))
    encoded = tokenizer(["a short one", "a longer one, so the first row is padded"], padding=True, return_tensors="np")
    batch = {name: encoded[name].astype(np.int64) for name in INPUTS}
    for fused in (False, True):
        folder = tmp_path / str(fused)
        folder.mkdir()
        fp32 = export(model, tokenizer, folder, skip_layer_norm=True) if fused else export(model, tokenizer, folder)
        for graph in (fp32, quantize(fp32, folder / "int8.onnx")):
            prefix = folder / graph.stem
            ort_session = (session(graph, skip_layer_norm=True, profile_prefix=prefix) if fused
                           else session(graph, profile_prefix=prefix))
            ort_session.run(None, batch)
            ops = set(kernel_seconds(ort_session))
            assert ("SkipLayerNormalization" in ops) is fused, (graph.name, fused, sorted(ops))
            assert fused or "LayerNormalization" in ops, (graph.name, sorted(ops))


def test_parallel_batches_run_on_the_pool_and_an_error_reaches_the_caller() -> None:
    seen: list[tuple[str, int]] = []

    def fail_on_three(batch: list[int]) -> None:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if 3 in batch:
            raise ValueError("batch 3")

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="batch 3"):
            for_each_batch(fail_on_three, [[0, 1], [2, 3], [4]], torch.device("cpu"), "fp32")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and all(name.startswith("batch") and intra_op == 1 for name, intra_op in seen)


def test_the_log_names_what_torch_computes_in(caplog: pytest.LogCaptureFixture) -> None:
    """precision auto for a linear probe is exact fp32 on CPU: the log says so, beside the param as written, and the
    features' meta records it."""
    with caplog.at_level("INFO", logger="stages"):
        _, meta = extract_features(["a fine film", "a dull one"], repo_cfg("backbone", max_length=32),
                                   repo_cfg("extract_features"), "linear_probe")
    expected = "torch fp32 on cpu"
    if torch.cuda.is_available():  # auto is autocast there
        expected = "torch bf16 on cuda" if torch.cuda.is_bf16_supported() else "torch fp16 on cuda"
    assert meta["precision"] == expected.split()[1]
    assert any(expected in r.message and "precision: auto" in r.message for r in caplog.records)
