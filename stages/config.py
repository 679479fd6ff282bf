"""Typed, validated view of params.yaml: the one place knobs and paths are parsed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # no defaults below: params.yaml is the one source


class Paths(_Section):
    raw: Path
    data_report: Path
    splits: Path
    preprocess_report: Path
    label_map: Path
    features: Path
    model: Path
    predictions: Path
    metrics: Path
    training_metrics: Path
    training_speed: Path
    plots: Path
    evaluation: Path
    registry: Path
    deployment: Path
    data_efficiency: Path
    data_efficiency_metrics: Path
    adaptation: Path
    adaptation_metrics: Path


class DataConfig(_Section):
    source: Path
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl", "folder", "vader"]
    text_column: str
    label_column: str
    domain_column: str | None
    empty_labels: Literal["error", "unlabeled"]
    vader_neutral_band: float = Field(ge=0.0, le=4.0)


class PreprocessConfig(_Section):
    seed: int
    train_domains: list[str] | None = Field(min_length=1)
    test_size: float = Field(gt=0.0, lt=1.0)
    val_size: float = Field(gt=0.0, lt=1.0)
    n_per_class: int | None = Field(ge=1)
    keep_unlabeled: bool
    min_chars: int = Field(ge=1)

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> PreprocessConfig:
        if self.test_size + self.val_size >= 0.9:
            raise ValueError("test_size + val_size must be below 0.9 to leave rows for training")
        if self.keep_unlabeled and self.n_per_class is None:
            raise ValueError("preprocess.keep_unlabeled keeps the training rows that preprocess.n_per_class leaves "
                             "out; set preprocess.n_per_class too")
        return self


class BackboneConfig(_Section):
    name: str
    revision: str | None = None
    max_length: int = Field(ge=8, le=4096)

    @model_validator(mode="after")
    def _revision_names_a_hub_commit(self) -> BackboneConfig:
        if self.revision is not None and self.name == "default":
            raise ValueError("revision applies to a hub id only; the default backbone is pinned by its package")
        return self


class ExtractConfig(_Section):
    batch_size: int = Field(ge=1)
    runtime: Literal["auto", "torch", "onnxruntime"]
    precision: Literal["auto", "fp32", "bf16", "int8"]

    @model_validator(mode="after")
    def _precision_fits_runtime(self) -> ExtractConfig:
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("precision int8 needs runtime onnxruntime (or auto)")
        if self.precision == "bf16" and self.runtime == "onnxruntime":
            raise ValueError("precision bf16 needs runtime torch (or auto)")
        return self


class LinearProbeConfig(_Section):
    C: float = Field(gt=0.0)
    max_iter: int = Field(ge=10)


class FinetuneConfig(_Section):
    epochs: int = Field(ge=1, le=100)
    min_steps: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0, lt=1.0)
    head_learning_rate_multiplier: float = Field(gt=0.0)
    layer_decay: float = Field(gt=0.0, le=1.0)
    weight_decay: float = Field(ge=0.0)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    freeze_layers: int = Field(ge=0)
    max_length: int = Field(ge=8, le=4096)
    patience: int = Field(ge=1)


class SelfTrainingConfig(_Section):
    epochs: int = Field(ge=0, le=100)
    confidence: float = Field(ge=0.0, le=1.0)
    rounds: int = Field(ge=1, le=10)


class ContrastiveConfig(_Section):
    pairs_per_row: int = Field(ge=0, le=1000)
    learning_rate: float = Field(gt=0.0, lt=1.0)
    batch_size: int = Field(ge=1)


class BaselineConfig(_Section):
    max_features: int = Field(ge=10)
    ngram_max: int = Field(ge=1, le=5)
    C: float = Field(gt=0.0)


class BlendConfig(_Section):
    weights: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(min_length=1)  # the n-gram model's share


class FineTuneConfig(_Section):
    strategy: Literal["linear_probe", "finetune"]
    seed: int
    linear_probe: LinearProbeConfig
    finetune: FinetuneConfig
    contrastive: ContrastiveConfig
    self_training: SelfTrainingConfig
    baseline: BaselineConfig
    blend: BlendConfig

    @model_validator(mode="after")
    def _lpft_options_need_finetune(self) -> FineTuneConfig:
        if self.self_training.epochs > 0 and self.strategy != "finetune":
            raise ValueError("fine_tune.self_training.epochs > 0 continues LP-FT: it needs fine_tune.strategy: finetune")
        if self.contrastive.pairs_per_row > 0 and self.strategy != "finetune":
            raise ValueError("fine_tune.contrastive.pairs_per_row > 0 trains the encoder before LP-FT: it needs "
                             "fine_tune.strategy: finetune")
        return self


class EvaluateConfig(_Section):
    calibration_bins: int = Field(ge=2, le=100)


class RegisterConfig(_Section):
    model_name: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_f1: float = Field(ge=0.0, le=1.0)
    min_gain_over_baseline: float = Field(ge=-1.0, le=1.0)
    min_gain_over_champion: float = Field(ge=-1.0, le=1.0)


class DeployConfig(_Section):
    host: str
    port: int = Field(ge=0, le=65535)
    startup_timeout_s: float = Field(gt=0.0)
    smoke_texts: list[str] = Field(min_length=1)


def _distinct(seeds: list[int]) -> list[int]:
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise ValueError(f"seeds {repeated} are repeated: a repeated seed is the same draw counted twice in the mean")
    return seeds


Seeds = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct)]


class DataEfficiencyConfig(_Section):
    labels_per_class: list[int | None] = Field(min_length=1)
    seeds: Seeds
    strategy: Literal["linear_probe", "finetune"]

    @model_validator(mode="after")
    def _positive_budgets(self) -> DataEfficiencyConfig:
        bad = [b for b in self.labels_per_class if b is not None and b < 1]
        if bad:
            raise ValueError(f"labels_per_class must be positive integers or null, got {bad}")
        return self


class AdaptConfig(_Section):
    labels_per_class: int = Field(ge=1, le=1000)
    seeds: Seeds
    steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0, lt=1.0)
    unlabeled_fraction: float = Field(ge=0.0, lt=1.0)
    self_training_steps: int = Field(ge=0)
    self_training_confidence: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _held_back_rows_are_used(self) -> AdaptConfig:
        if self.unlabeled_fraction > 0.0 and self.self_training_steps == 0:
            raise ValueError("unlabeled_fraction > 0 holds target rows back as unlabelled text, which only "
                             "self_training_steps > 0 uses: set both, or neither (it would only shrink the scored rows)")
        return self


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    paths: Paths
    data: DataConfig
    preprocess: PreprocessConfig
    backbone: BackboneConfig
    extract_features: ExtractConfig
    fine_tune: FineTuneConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    deploy: DeployConfig
    data_efficiency: DataEfficiencyConfig
    adapt: AdaptConfig


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
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise PipelineError(f"{path} is not valid YAML: {error}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, path)) from None
