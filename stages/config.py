"""Typed, validated view of params.yaml: the one place knobs and paths are parsed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    raw: Path
    data_report: Path
    splits: Path
    label_map: Path
    features: Path
    model: Path
    predictions: Path
    metrics: Path
    plots: Path
    evaluation: Path
    registry: Path
    deployment: Path


class DataConfig(_Section):
    source: Path
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl", "folder", "vader"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    domain_column: str | None = None
    vader_neutral_band: float = Field(0.0, ge=0.0, le=4.0)


class PreprocessConfig(_Section):
    seed: int = 0
    train_domains: list[str] | None = None
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    val_size: float = Field(0.1, gt=0.0, lt=1.0)
    n_per_class: int | None = Field(None, ge=1)
    min_chars: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> "PreprocessConfig":
        if self.test_size + self.val_size >= 0.9:
            raise ValueError("test_size + val_size must be below 0.9 to leave rows for training")
        return self


class BackboneConfig(_Section):
    name: str = "default"
    max_length: int = Field(128, ge=8, le=4096)


class ExtractConfig(_Section):
    batch_size: int = Field(64, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class LinearProbeConfig(_Section):
    C: float = Field(1.0, gt=0.0)
    max_iter: int = Field(2000, ge=10)


class FinetuneConfig(_Section):
    epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0)
    head_learning_rate_multiplier: float = Field(20.0, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_layers: int = Field(0, ge=0)
    max_length: int = Field(64, ge=8, le=4096)
    patience: int = Field(1, ge=1)


class BaselineConfig(_Section):
    max_features: int = Field(50000, ge=10)
    ngram_max: int = Field(2, ge=1, le=5)
    C: float = Field(4.0, gt=0.0)


class FineTuneConfig(_Section):
    strategy: Literal["linear_probe", "finetune"] = "linear_probe"
    seed: int = 0
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    baseline: BaselineConfig = BaselineConfig()


class EvaluateConfig(_Section):
    calibration_bins: int = Field(10, ge=2, le=100)


class RegisterConfig(_Section):
    model_name: str = Field("transfer-classifier", min_length=1)
    experiment: str = Field("transfer-pipeline", min_length=1)
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    min_macro_f1: float = Field(0.0, ge=0.0, le=1.0)
    min_gain_over_baseline: float = Field(0.0, ge=-1.0, le=1.0)
    min_gain_over_champion: float = Field(0.0, ge=-1.0, le=1.0)


class DeployConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    startup_timeout_s: float = Field(180.0, gt=0.0)
    smoke_texts: list[str] = Field(min_length=1)


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    paths: Paths
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract_features: ExtractConfig = ExtractConfig()
    fine_tune: FineTuneConfig = FineTuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    deploy: DeployConfig


def _describe(error: ValidationError, path: Path) -> str:
    lines = [f"invalid parameters in {path}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise PipelineError naming the bad key."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run from the project root or pass the params file")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, path)) from None
