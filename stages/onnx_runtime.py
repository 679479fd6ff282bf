"""The backbone on ONNX Runtime: exported from the loaded torch model, fused for CPU, optionally int8-quantized.

Exported fresh on every call into a temporary folder (a few seconds), so the graph always matches the weights in
use; the export is checked against torch on a padded batch before anything is embedded with it.

The residual Add + LayerNormalization pairs are left unfused: ORT's SkipLayerNormalization kernel, which would
replace each pair, ran 3x to 6x slower on CPU than the pair (onnxruntime 1.31, `benchmarks.ort_fusions`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.errors import PipelineError

if TYPE_CHECKING:
    from onnxruntime.transformers.fusion_options import FusionOptions

INPUTS = ("input_ids", "attention_mask")
CHECK_TOLERANCE = 1e-3  # fp32 export vs torch, max abs difference of hidden states


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's optimizer and quantizer log progress (and "pre-process first") at INFO/WARNING on loggers
    of their own module names; the pipeline log shows only their errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _LastHidden(torch.nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _padded_probe(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    # Rows of different lengths: the traced graph must keep the attention mask (an all-ones mask may be dropped).
    return dict(tokenizer(["a short one", "a somewhat longer sentence, so the first row is padded"], padding=True,
                          return_tensors="pt"))


def _fusion_options(skip_layer_norm: bool) -> FusionOptions:
    """ORT's BERT fusions, SkipLayerNormalization only if asked for (see the module docstring)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    return options


def export(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, *,
           skip_layer_norm: bool = False) -> Path:
    """fp32 ONNX graph of `model` (batch and sequence length dynamic), fused by ORT's transformer optimizer; each
    residual Add + LayerNormalization stays two ops unless `skip_layer_norm`."""
    from onnxruntime.transformers.optimizer import optimize_model

    wrapper = _LastHidden(model.cpu()).eval()
    probe = _padded_probe(tokenizer)
    raw, fused = folder / "raw.onnx", folder / "model.onnx"
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
               "last_hidden_state": {0: "batch", 1: "tokens"}}
    # Tracing warns about data-dependent branches; the padded probe takes the masked path, and check_export verifies.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(wrapper, (probe["input_ids"], probe["attention_mask"]), str(raw), input_names=list(INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, dynamo=False, opset_version=17)
    config = model.config
    with _quiet():
        optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size,
                                   optimization_options=_fusion_options(skip_layer_norm))
        optimized.save_model_to_file(str(fused))
    return fused


def quantize(fp32: Path, target: Path) -> Path:
    """Dynamic int8 quantization: weights per output channel (per-tensor costs ~2 points of probe accuracy here),
    activations per batch at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return target


def session(path: Path, *, skip_layer_norm: bool = False, profile_prefix: Path | None = None):
    """One intra-op thread per call: `embed` runs as many calls at once as torch has threads, each on whole batches
    (as on the torch path), which runs int8 faster than one call at a time on two threads, with the same output.
    The session's own optimizer would fuse Add + LayerNormalization again unless told not to."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:  # benchmarks.ort_fusions and its test read which ops ran
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=[] if skip_layer_norm else ["SkipLayerNormFusion"])


def check_export(run: Callable[[dict[str, torch.Tensor]], torch.Tensor], model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> float:
    probe = _padded_probe(tokenizer)
    with torch.inference_mode():
        expected = model(**probe).last_hidden_state
    mask = probe["attention_mask"].bool()
    difference = float((run(probe) - expected).abs()[mask].max())
    if difference > CHECK_TOLERANCE:
        raise PipelineError(f"extract_features.runtime onnxruntime: the exported backbone differs from torch by "
                            f"{difference:.2e} on a padded batch; use runtime: torch for this backbone")
    return difference


def onnx_forward(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 precision: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A forward function (padded batch -> last hidden state) running the backbone on ONNX Runtime; thread-safe,
    one thread per call."""
    with tempfile.TemporaryDirectory(prefix="onnx-backbone-") as tmp:
        fp32 = export(model, tokenizer, Path(tmp))
        fp32_session = session(fp32)

        def run_fp32(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return run_session(fp32_session, batch)

        check_export(run_fp32, model, tokenizer)
        if precision != "int8":
            return run_fp32
        int8_session = session(quantize(fp32, Path(tmp) / "int8.onnx"))
    return lambda batch: run_session(int8_session, batch)


def run_session(ort_session, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state of one padded batch."""
    feeds = {name: batch[name].numpy().astype(np.int64) for name in INPUTS}
    return torch.from_numpy(ort_session.run(None, feeds)[0])
