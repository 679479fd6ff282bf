"""The pretrained backbone: load it (resolved offline by `stages.hub`), pick the device, embed texts (mean pooling,
length bucketing)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from stages.errors import PipelineError
from stages.hub import resolve_backbone

log = logging.getLogger("stages")


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bf16_cpu() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Without it torch emulates bf16, ~10x slower."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def amx_cpu() -> bool:
    """Does this CPU have AMX tiles? Only there does bf16 beat int8: on a Xeon with AVX512-BF16 but no AMX, bf16
    extraction ran at about 0.6x exact fp32 and int8 at about 1.4x (docs/results.md: speed against the peers)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """fp32: exact. bf16: bf16 autocast anywhere. auto: mixed precision on CUDA (bf16, else fp16), exact on CPU.

    (int8 is an onnxruntime precision: torch itself runs exact.)"""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


# On CUDA in bf16/fp16, torch prefers cuDNN attention, which builds a graph for every new padded length the first
# time it sees it: with length-bucketed batches that warm-up was most of a fine-tuning epoch on an H100 (docs/results.md: on a GPU).
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextmanager
def compute_context(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast as `autocast_dtype` says, and on CUDA the attention kernels that need no per-shape warm-up."""
    with ExitStack() as stack:
        dtype = autocast_dtype(device, precision)
        if dtype is not None:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        if device.type == "cuda":
            stack.enter_context(sdpa_kernel(CUDA_ATTENTION))
        yield


# What a tokenizer is saved as: without one of these, transformers would build an empty vocabulary in which every
# word is [UNK], and the pipeline would train on nothing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")
PICKLED = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def check_backbone_folder(name: str, path: str) -> None:
    """What a backbone folder must hold: a config, a tokenizer, and weights as safetensors. Pickled weights
    (pytorch_model.bin, *.pt) are refused, never unpickled."""
    folder = Path(path)
    where = f"backbone.name {name!r}: {folder}"
    save = "save the backbone with `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`"
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{where} has no config.json; {save}")
    if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise PipelineError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {save}")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
        found = (f"it has {', '.join(pickled)}, pickled weights, which are never loaded" if pickled else
                 "a hub model's pickled weights are never fetched")
        raise PipelineError(f"{where} has no *.safetensors weights ({found}); {save} (safetensors is its default)")


def _why(error: Exception) -> str:
    if "trust_remote_code" in str(error):  # transformers' advice would be to run the code
        return ("it needs custom code (config.json's auto_map), which is never run here; pick a backbone of a "
                "model type transformers has built in")
    return str(error)


@contextmanager
def no_unpickling(name: str) -> Iterator[None]:
    """torch.load refused while transformers reads a backbone: a pickled file that a config (`transformers_weights`)
    or a safetensors index names is never read, even though *.safetensors files are there."""
    def refuse(file: object, *_args: object, **_kwargs: object) -> None:
        raise PipelineError(f"backbone.name {name!r}: loading it would unpickle {file}, which its config.json or "
                            "model.safetensors.index.json names; weights are only read from safetensors")

    original, torch.load = torch.load, refuse
    try:
        yield
    finally:
        torch.load = original


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    return _tokenizer(name, resolve_backbone(name, revision))


def _tokenizer(name: str, path: str) -> PreTrainedTokenizerBase:
    check_backbone_folder(name, path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise PipelineError(f"backbone.name {name!r}: cannot load a tokenizer from {path} ({_why(error)})") from None


def check_weights_loaded(name: str, path: str, model_type: str, loaded: dict[str, object]) -> None:
    """Every weight the encoder uses came from the folder: one the files lack (a `module.` prefix from DDP, a
    config with more layers than the weights) would be drawn at random, and differently at each load. The pooler
    is not used (mean pooling), so a checkpoint without it loads."""
    missing = sorted(k for k in loaded["missing_keys"] if "pooler" not in k.split("."))
    if missing or loaded["mismatched_keys"]:
        found = sorted(loaded["unexpected_keys"])
        raise PipelineError(
            f"backbone.name {name!r}: the weights in {path} do not fit its config.json ({model_type}): "
            + (f"{len(missing)} weights are missing, e.g. {', '.join(missing[:3])}" if missing else "")
            + (f"; {len(loaded['mismatched_keys'])} have another shape" if loaded["mismatched_keys"] else "")
            + (f"; the files hold {len(found)} weights under other names, e.g. {', '.join(found[:3])}" if found
               else "") + ". They would be random: save the model with save_pretrained, or fix config.json")
    if loaded["unexpected_keys"]:
        log.info("backbone.name %r: %d weights in %s are not part of %s and are not used (e.g. a pretraining head)",
                 name, len(loaded["unexpected_keys"]), path, model_type)


def load_encoder(name: str, device: torch.device,
                 revision: str | None = None) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and model of a backbone. Custom code a config names (`auto_map`) is never run: a model that
    needs it is refused, and one of a built-in type loads as that type."""
    path = resolve_backbone(name, revision)
    tokenizer = _tokenizer(name, path)
    try:
        with no_unpickling(name):
            model, loaded = AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False,
                                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise PipelineError(f"backbone.name {name!r}: cannot load a model from {path} ({_why(error)})") from None
    check_weights_loaded(name, path, type(model).__name__, loaded)
    if "auto_map" in model.config.to_dict():
        log.warning("backbone.name %r: config.json's auto_map (custom code) is ignored; loaded as the built-in %s",
                    name, type(model).__name__)
    vocabulary = getattr(model.config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise PipelineError(f"backbone.name {name!r}: its tokenizer has {len(tokenizer)} tokens but the model only "
                            f"{vocabulary} embeddings: they do not belong together")
    return tokenizer, model.to(device).eval()


CHARS_PER_TOKEN = 32  # a text longer than max_length times this is cut at a space before it is tokenized


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> BatchEncoding:
    """`tokenizer(texts, truncation=True, max_length=max_length)`, the same ids, without tokenizing what truncation
    drops: a 100k-character request took seconds and gigabytes to tokenize, for its first max_length tokens."""
    return tokenizer([clip(text, tokenizer, max_length) for text in texts], truncation=True, max_length=max_length)


def clip(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> str:
    """`text`, or its start up to a run of spaces, when that start alone has more than max_length tokens. No token
    spans a space (BERT's, BPE's and SentencePiece's pre-tokenizers split there), so the first max_length are the
    whole text's, and the token at the cut is never kept. Truncation from the left keeps the text's end: no cut."""
    limit = max_length * CHARS_PER_TOKEN
    if len(text) <= limit or tokenizer.truncation_side != "right":
        return text
    head = text[:max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit), 0)].rstrip()
    if not head:
        return text
    ids = tokenizer(head, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]
    return head if len(ids) > max_length else text


def usable_length(requested: int, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """Truncate to what the backbone can take (position embeddings), whatever params ask for."""
    positions = getattr(model.config, "max_position_embeddings", None) or requested
    return max(8, min(requested, positions, tokenizer.model_max_length))


def length_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, so each batch pads to little more than its own longest text."""
    order = np.argsort(lengths, kind="stable")[::-1]
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size].tolist()


def pad_batch(ids: Sequence[list[int]], rows: Sequence[int], tokenizer: PreTrainedTokenizerBase,
              device: torch.device) -> dict[str, torch.Tensor]:
    """`ids[rows]` padded into input_ids + attention_mask on `device`, on the tokenizer's padding side: what
    `tokenizer.pad` returns, without its per-token Python walk (the largest CPU cost of GPU extraction)."""
    width = max(len(ids[i]) for i in rows)
    input_ids = np.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    left = tokenizer.padding_side == "left"
    for j, i in enumerate(rows):
        span = slice(width - len(ids[i]), width) if left else slice(0, len(ids[i]))
        input_ids[j, span] = ids[i]
        mask[j, span] = 1
    return {"input_ids": torch.from_numpy(input_ids).to(device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask).to(device, non_blocking=True)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


_THREADS = threading.Lock()  # torch's intra-op thread count is process-wide: one batch-parallel region at a time


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    with _THREADS:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def for_each_batch(work: Callable[[list[int]], None], batches: Sequence[list[int]], device: torch.device,
                   precision: str) -> None:
    """Call `work(batch)` for every batch under inference mode and `compute_context`. On a CPU with several threads
    and more than one batch, each thread takes whole batches with one intra-op thread of its own, instead of every
    thread sharing each small batch's products and waiting at each op's barrier (README: speed against the peers);
    a batch's arithmetic is the same either way."""
    threads = torch.get_num_threads()

    def run(batch: list[int]) -> None:  # inference and autocast modes are per thread
        with torch.inference_mode(), compute_context(device, precision):
            work(batch)

    if device.type != "cpu" or threads < 2 or len(batches) < 2:
        for batch in batches:
            run(batch)
        return
    with _intra_op_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="batch") as pool:
        for _ in pool.map(run, batches):  # re-raises a batch's error here
            pass


Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # padded batch -> last hidden state; thread-safe


def embed(texts: list[str], tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, *, max_length: int,
          batch_size: int, precision: str = "auto", normalize: bool = True, forward: Forward | None = None) -> np.ndarray:
    """Embed `texts` with the frozen encoder (or `forward`, another runtime of it, which `for_each_batch` may call
    from several threads at once); input order, float32."""
    device = next(model.parameters()).device
    run = forward or (lambda inputs: model(**inputs).last_hidden_state)
    encoded = tokenize(tokenizer, texts, usable_length(max_length, tokenizer, model))
    ids = encoded["input_ids"]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)

    def embed_batch(batch: list[int]) -> None:
        padded = pad_batch(ids, batch, tokenizer, device)
        pooled = mean_pool(run(padded).float(), padded["attention_mask"])
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out[batch] = pooled.cpu().numpy()

    for_each_batch(embed_batch, list(length_batches([len(x) for x in ids], batch_size)), device, precision)
    return out
