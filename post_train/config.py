"""Typed, validated configuration: recipe YAML + scale YAML + overrides -> `PipelineConfig`.

A recipe names *what* to train (objectives, learning rates); a scale names *how much*
(data sizes, steps, model size). They merge as: defaults <- scale <- recipe (and the
recipes it `extends`) <- overrides. Every key is checked; an unknown key, a bad value or
an unknown objective is refused with the path of the field before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from losses import PREFERENCE_LOSSES, SFT_OBJECTIVES, preference_loss, sft_objective

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
SCALES_DIR = RECIPES_DIR / "scales"


class ConfigError(ValueError):
    """A recipe, scale or override that cannot become a valid configuration."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(StrictModel):
    """Optimisation settings shared by every training stage."""

    learning_rate: float = Field(gt=0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(default=32, ge=1, description="Sequences (or pairs) per optimizer step, all processes.")
    micro_batch_size: int = Field(default=16, ge=1, description="Sequences (or pairs) per forward pass and process.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=256, ge=8, description="Tokens per sequence; longer ones are truncated.")
    log_every: int = Field(default=5, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> "TrainConfig":
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must not exceed batch_size ({self.batch_size})"
            )
        return self


class BaseModelConfig(StrictModel):
    """The demo world's tiny Llama, pretrained by the flow when no `model.name_or_path` is given."""

    vocab_size: int = Field(default=256, ge=32)
    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    train: TrainConfig = TrainConfig(learning_rate=3e-3, max_length=64, batch_size=64, micro_batch_size=64)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BaseModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelConfig(StrictModel):
    name_or_path: str | None = Field(
        default=None,
        description="A Hugging Face model name or a local directory; None builds and pretrains the demo base model.",
    )


class DataConfig(StrictModel):
    """Where the datasets come from.

    With `world` set, DVC's `world@<world>` stage generates all three files. Any of `sft`,
    `preferences`, `eval` may instead name a local file/directory or a Hub dataset
    (`name` or `name:split`), in TRL's formats.
    """

    world: str | None = "demo"
    sft: str | None = None
    preferences: str | None = None
    eval: str | None = None
    dvc_root: str = Field(default=".", description="Directory holding dvc.yaml (and params.yaml).")

    @model_validator(mode="after")
    def _sources_complete(self) -> "DataConfig":
        missing = [name for name in ("sft", "preferences", "eval") if getattr(self, name) is None]
        if self.world is None and missing:
            raise ValueError(f"without a demo world, data.{', data.'.join(missing)} must be given")
        return self


class SFTConfig(TrainConfig):
    objective: str = "nll"
    objective_params: dict[str, float] = {}
    diagnostics_every: int = Field(default=10, ge=1, description="Steps between KL-to-base/entropy checks.")
    diagnostics_batch_size: int = Field(default=32, ge=1)
    rollout_steps: int = Field(
        default=8, ge=1, description="Objectives with an old policy (psft): optimizer steps per old-policy snapshot, K."
    )

    @field_validator("objective")
    @classmethod
    def _objective_exists(cls, name: str) -> str:
        if name not in SFT_OBJECTIVES:
            raise ValueError(f"unknown SFT objective {name!r}; valid: {', '.join(SFT_OBJECTIVES)}")
        return name

    @model_validator(mode="after")
    def _objective_params_fit(self) -> "SFTConfig":
        sft_objective(self.objective, **self.objective_params)
        return self


class DPOConfig(TrainConfig):
    loss: str = "sigmoid"
    loss_params: dict[str, float] = {"beta": 0.1}

    @field_validator("loss")
    @classmethod
    def _loss_exists(cls, name: str) -> str:
        if name not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(PREFERENCE_LOSSES)}")
        return name

    @model_validator(mode="after")
    def _loss_params_fit(self) -> "DPOConfig":
        preference_loss(self.loss, **self.loss_params)
        return self


class EvaluationConfig(StrictModel):
    judge: Literal["gold"] = "gold"
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0


class RegistryConfig(StrictModel):
    model_name: str = "post-train"
    champion_alias: str = "champion"


class ComputeConfig(StrictModel):
    num_processes: int = Field(default=1, ge=1, description="Processes per training stage; more than 1 uses `accelerate launch`.")


class PipelineConfig(StrictModel):
    recipe: str
    scale: str
    description: str = ""
    model: ModelConfig = ModelConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig
    dpo: DPOConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    compute: ComputeConfig = ComputeConfig()
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    runs_dir: str = "runs"
    cache_dir: str = "cache"

    @field_validator("recipe", "scale")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    def fingerprint(self, *sections: str) -> str:
        """A short content hash of the named sections (all when none), for cache keys."""
        dumped = self.model_dump(mode="json")
        chosen = {name: dumped[name] for name in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(content).__name__}")
    return content


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def available_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def available_scales() -> list[str]:
    return sorted(path.stem for path in SCALES_DIR.glob("*.yaml"))


def _resolve_yaml(name: str, directory: Path, kind: str, choices: list[str]) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"{kind} file {candidate} does not exist")
        return candidate
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} {name!r}; available: {', '.join(choices)} (or a path to a .yaml file)")
    return path


def load_recipe(name: str, _seen: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """A recipe's settings with the recipes it `extends` merged beneath it."""
    path = _resolve_yaml(name, RECIPES_DIR, "recipe", available_recipes())
    if str(path) in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle: {' -> '.join(_seen + (str(path),))}")
    content = _read_yaml(path)
    parent = content.pop("extends", None)
    if parent is None:
        return path, content
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must name one recipe, got {parent!r}")
    _, parent_content = load_recipe(parent, _seen + (str(path),))
    return path, deep_merge(parent_content, content)


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Nested overrides from `{"sft.learning_rate": 1e-4}` or `["sft.learning_rate=1e-4"]`.

    Values given as strings are parsed as YAML scalars, so `1e-4` becomes a float.
    """
    if not overrides:
        return {}
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key.path=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = yaml.safe_load(value)
        overrides = pairs
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value else value
        keys = dotted.split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return nested


def load_config(
    recipe: str,
    scale: str = "demo",
    overrides: dict[str, Any] | list[str] | None = None,
) -> PipelineConfig:
    """Validate a recipe at a scale, with overrides, into a `PipelineConfig`."""
    recipe_path, recipe_content = load_recipe(recipe)
    scale_path = _resolve_yaml(scale, SCALES_DIR, "scale", available_scales())
    merged = deep_merge(_read_yaml(scale_path), recipe_content)
    merged = deep_merge(merged, parse_overrides(overrides))
    merged["recipe"] = recipe_path.stem
    merged["scale"] = scale_path.stem
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ConfigError(
            f"invalid configuration from recipe {recipe_path} at scale {scale_path}:\n{problems}"
        ) from None
