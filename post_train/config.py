"""Typed, validated configuration: recipe YAML + scale YAML + overrides -> `PipelineConfig`.

A recipe names *what* to train (objectives, learning rates); a scale names *how much*
(data sizes, steps, model size). They merge as: defaults <- scale <- recipe (and the
recipes it `extends`) <- overrides. Every key is checked; an unknown key, a bad value or
an unknown objective is refused with the path of the field before any work starts.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from post_train.errors import ConfigError
from post_train.executors import EXECUTORS
from post_train.generators import GENERATORS
from post_train.judges import JUDGES, judge_class

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
SCALES_DIR = RECIPES_DIR / "scales"


def _registered(kind: str, name: str, registry: Collection[str]) -> str:
    """`name` when `registry` (a plug-in registry: objectives, losses, judges, generators, executors) has it; else
    the ValueError a field validator raises, naming what is registered in the registry's order."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(registry)}")
    return name


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
    divergence_factor: float | None = Field(
        default=10.0,
        gt=1,
        description="Stop training when a step's loss is more than this many times its running level (an "
        "exponential average of the earlier steps' losses, when that level is positive); null turns the check off. "
        "A non-finite loss or gradient norm always stops it.",
    )
    fused_logprobs: bool = Field(
        default=True,
        description="Compute target log-probs from the last hidden states through the output layer chunk by chunk, "
        "never holding the logits (one process or DDP; not under FSDP/DeepSpeed, where the model's own output layer "
        "runs at the counted positions only).",
    )
    padding_free: bool = Field(
        default=True,
        description="Concatenate a micro-batch's sequences into one row (position ids restart per sequence, no "
        "attention across them) instead of padding them to the longest.",
    )

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


DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""`model.chat_template: default`: Zephyr-style turns in plain text (`<|user|>`, `<|assistant|>`), each ended
by the tokenizer's EOS token, so a base model (Llama-3-8B base has no chat template) learns to stop. The
prompt rendered with the generation prompt is a prefix of the rendered conversation, as SFT needs."""


class ModelConfig(StrictModel):
    name_or_path: str | None = Field(
        default=None,
        description="A Hugging Face model name or a local directory; None builds and pretrains the demo base model.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template (Jinja) set when the model's tokenizer has none; "
        "`default` is DEFAULT_CHAT_TEMPLATE. A tokenizer's own template is always kept.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_compiles(cls, template: str | None) -> str | None:
        if template is None or template == "default":
            return template
        import jinja2

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"not a valid Jinja template ({error}); use `default` or a chat template") from None
        if "messages" not in template:
            raise ValueError("a chat template must render `messages`; use `default` or a chat template")
        return template

    def resolved_chat_template(self) -> str | None:
        return DEFAULT_CHAT_TEMPLATE if self.chat_template == "default" else self.chat_template


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


class PromptCompletionConfig(TrainConfig):
    """A stage that trains on prompts and completions (SFT, DPO): how they fit `max_length` (TRL's truncation
    settings, `post_train.data.Truncation`) and how much of the dataset may be left out."""

    max_prompt_length: int | None = Field(
        default=None, ge=1, description="Tokens of prompt at most; a longer one is cut per truncation_mode."
    )
    max_completion_length: int | None = Field(
        default=None, ge=1, description="Tokens of completion at most; a longer one loses its end."
    )
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        default="keep_start",
        description="keep_start: a sequence over max_length loses its completion's end; keep_end: its prompt's "
        "start first (whole turns of a conversation).",
    )
    max_dropped_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Refuse the dataset when more than this share of its rows cannot be used (empty completions, "
        "identical preference responses, prompts that leave no room); all of them is always refused.",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> "PromptCompletionConfig":
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length}), "
                "to leave room for the completion"
            )
        return self


DATASET_SECTIONS = {"sft": "sft", "preferences": "dpo"}
"""The training section whose truncation and `max_dropped_share` apply to each dataset."""


class SFTConfig(PromptCompletionConfig):
    objective: str = "nll"
    objective_params: dict[str, float] = {}
    diagnostics_every: int = Field(default=10, ge=1, description="Steps between KL-to-base/entropy checks.")
    diagnostics_batch_size: int = Field(default=32, ge=1)
    rollout_steps: int = Field(
        default=8, ge=1, description="Objectives with an old policy (psft): optimizer steps per old-policy snapshot, K."
    )
    kl_budget: float | None = Field(
        default=None,
        gt=0,
        description="Nats per token: scale the learning rate so the KL to the base measured every diagnostics_every "
        "steps tracks this budget (post_train.kl_budget); null: the schedule's learning rate as it is.",
    )
    kl_budget_metric: Literal["kl_to_base", "native_kl_to_base"] = Field(
        default="kl_to_base",
        description="The KL the budget holds: on held-out responses, or (demo world) on the base's own terse format.",
    )
    kl_budget_gain: float = Field(
        default=1.0, gt=0, description="How far one measurement moves log(lr) at most (the controller's gain)."
    )

    # `losses` (torch, ~2 s) is imported when a config is checked, not with this module: the command line reads
    # the recipes and starts its stage server before it checks anything.
    @field_validator("objective")
    @classmethod
    def _objective_exists(cls, name: str) -> str:
        from losses import SFT_OBJECTIVES

        return _registered("SFT objective", name, SFT_OBJECTIVES)

    @model_validator(mode="after")
    def _objective_params_fit(self) -> "SFTConfig":
        from losses import sft_objective

        sft_objective(self.objective, **self.objective_params)
        return self


class DPOConfig(PromptCompletionConfig):
    loss: str = "sigmoid"
    loss_params: dict[str, float] = {"beta": 0.1}

    @field_validator("loss")
    @classmethod
    def _loss_exists(cls, name: str) -> str:
        from losses import PREFERENCE_LOSSES

        return _registered("preference loss", name, PREFERENCE_LOSSES)

    @model_validator(mode="after")
    def _loss_params_fit(self) -> "DPOConfig":
        from losses import preference_loss

        preference_loss(self.loss, **self.loss_params)
        return self


class JointConfig(PromptCompletionConfig):
    """`pipeline: joint`: one stage trains on demonstrations with the SFT objective (`sft.objective`) and on pairs
    with the preference loss (`dpo.loss`) at once, in place of DPO after SFT (tasks/joint.py)."""

    learning_rate: float = Field(default=2e-4, gt=0)
    sft_weight: float = Field(default=1.0, ge=0, description="Weight of the SFT objective's token mean.")
    dpo_weight: float = Field(default=1.0, ge=0, description="Weight of the preference loss's pair mean.")
    start: Literal["sft", "base"] = Field(
        default="sft",
        description="The model the joint stage starts from and holds as its reference: the SFT stage's (in a joint "
        "recipe a short warm-up, sft.max_steps), or the base model, the SFT stage then not run.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> "JointConfig":
        if self.sft_weight == 0 and self.dpo_weight == 0:
            raise ValueError("joint.sft_weight and joint.dpo_weight are both 0: nothing to train on")
        return self


class EvaluationSettings(StrictModel):
    """`evaluation` but the judges' sections, which `EvaluationConfig` adds: one per entry of `JUDGES`."""

    judge: str = Field(
        default="gold",
        description="A name in post_train.judges.JUDGES; the judge's settings are the section `evaluation.<judge>`.",
    )
    backend: str = Field(
        default="transformers",
        description="A name in post_train.generators.GENERATORS: transformers (batched, KV cache, in the stage's "
        "process) or vllm (installed separately, GPU).",
    )
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0
    bootstrap_samples: int = Field(default=1000, ge=100, description="Resamples of the bootstrap confidence interval.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Level of the bootstrap interval.")
    diagnostics: bool = Field(
        default=True,
        description="Implicit-reward accuracy, Q-value rank correlation, KL to base and entropy (evaluate stage).",
    )
    diagnostics_max_examples: int = Field(
        default=200, ge=1, description="Evaluation prompts the diagnostics use at most."
    )
    diagnostics_max_length: int | None = Field(
        default=None,
        ge=2,
        description="Tokens of prompt and response the diagnostics score; default: the longer of sft/dpo max_length.",
    )
    diagnostics_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Sequences per diagnostics forward pass; default: sft.diagnostics_batch_size.",
    )

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, value: str) -> str:
        return _registered("judge", value, JUDGES)

    @field_validator("backend")
    @classmethod
    def _known_generator(cls, value: str) -> str:
        return _registered("generation backend", value, GENERATORS)

    @model_validator(mode="after")
    def _judge_settings_given(self) -> "EvaluationSettings":
        """A judge with required settings needs its section; one whose settings all have defaults does not."""
        if getattr(self, self.judge) is None:
            required = [
                name
                for name, field in judge_class(self.judge).settings_model.model_fields.items()
                if field.is_required()
            ]
            if required:
                raise ValueError(f"judge {self.judge} needs evaluation.{self.judge} (at least {', '.join(required)})")
        return self

    def judge_settings(self) -> BaseModel:
        """The chosen judge's settings: its section, or its defaults when the recipe has none."""
        return getattr(self, self.judge) or judge_class(self.judge).settings_model()


EvaluationConfig = create_model(
    "EvaluationConfig",
    __base__=EvaluationSettings,
    __module__=__name__,
    __doc__="`evaluation`: generation, statistics, diagnostics, the judge, and each judge's `evaluation.<judge>`",
    **{name: (judge_class(name).settings_model | None, None) for name in JUDGES},
)


class RegistryConfig(StrictModel):
    model_name: str = Field(
        default="post-train",
        description="The registered model. Versions compete for its champion alias only when they are comparable "
        "(same evaluation set, judge and tokenizer): give each dataset or model a name of its own.",
    )
    champion_alias: str = "champion"
    challenger_alias: str = Field(default="challenger", description="Alias of the newest registered version.")
    promotion_ci_lower_bound: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A challenger becomes champion when its head-to-head win rate against the champion is above 0.5 "
        "and the lower bound of its bootstrap confidence interval is above this.",
    )
    min_effect: float = Field(
        default=0.02,
        ge=0,
        le=0.5,
        description="A challenger becomes champion only when its head-to-head win rate minus 0.5 is at least this, "
        "for the soft (`win_rate/all`) and the discrete (`win_rate_discrete/all`) win rate alike: a weak judge's "
        "preferences near 0.5 give a tight CI around a negligible effect.",
    )
    min_win_rate: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="The first version becomes champion only when its win rate against the references "
        "(`win_rate/all`) is at least this; below it, it is registered and not promoted.",
    )
    promote_regressed: bool = Field(
        default=False,
        description="Promote a model even when a training stage that made it ended worse than it started (final loss "
        "above its first, DPO reward accuracy below chance); such a model is registered and flagged either way.",
    )

    @model_validator(mode="after")
    def _aliases_differ(self) -> "RegistryConfig":
        if self.champion_alias == self.challenger_alias:
            raise ValueError("champion_alias and challenger_alias must differ")
        return self


ACCELERATE_CONFIGS_DIR = REPO_ROOT / "configs" / "accelerate"
BUCKET_SCHEMES = ("s3://", "gs://", "r2://", "https://", "cos://", "oci://", "nebius://")


def available_accelerate_configs() -> list[str]:
    return sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def _inside(path: str, root: str) -> bool:
    return Path(path).is_absolute() and Path(path).resolve().is_relative_to(Path(root).resolve())


STAGES = ("pretrain", "sft", "dpo", "joint", "evaluate", "head-to-head")
"""The stages that run as commands somewhere (`compute.stages.<stage>` places one of them)."""


def _known_backend(value: str) -> str:
    return _registered("backend", value, EXECUTORS)


def _accelerate_config_exists(value: str | None) -> str | None:
    if value is None or value in available_accelerate_configs() or Path(value).is_file():
        return value
    raise ValueError(
        f"{value!r} is neither a config in configs/accelerate/ ({', '.join(available_accelerate_configs())}) nor a file"
    )


def _accelerators_format(value: str) -> str:
    name, _, count = value.partition(":")
    if not name or (count and not count.isdigit()) or (count and int(count) < 1):
        raise ValueError(f"{value!r}: expected SkyPilot's NAME or NAME:COUNT, e.g. H100:8")
    return value


Backend = Annotated[str, AfterValidator(_known_backend)]
AccelerateConfig = Annotated[str | None, AfterValidator(_accelerate_config_exists)]
Accelerators = Annotated[str, AfterValidator(_accelerators_format)]


class StagePlacement(StrictModel):
    """`compute.stages.<stage>`: where one stage runs, over the global `compute` settings (unset = global)."""

    backend: Backend | None = None
    num_processes: int | None = Field(default=None, ge=1)
    accelerate_config: AccelerateConfig = None
    accelerators: Accelerators | None = None
    num_nodes: int | None = Field(default=None, ge=1)
    infra: str | None = None
    use_spot: bool | None = None
    disk_size: int | None = Field(default=None, ge=50)


class ComputeConfig(StrictModel):
    """Where and on how many processes the training, SFT, DPO and evaluation stages run.

    `local`: a child process on this machine (`accelerate launch` with more than one process).
    `skypilot`: the same command as a SkyPilot managed job (`sky/stage.yaml`) on `num_nodes` machines
    with `accelerators` each, one process per GPU; run and cache directories live on `bucket`, mounted
    at `remote_root` on the cloud machines and, at the same path, on the machine that launches.
    `stages` places single stages elsewhere (e.g. `stages: {evaluate: {backend: local}}`).
    None of these settings changes what a stage computes, so none is part of a stage's cache key.
    """

    backend: Backend = Field(default="local", description="Where stages run: a name in post_train.executors.EXECUTORS.")
    num_processes: int = Field(
        default=1, ge=1, description="local: processes per training stage; more than 1 uses `accelerate launch`."
    )
    accelerate_config: AccelerateConfig = Field(
        default=None,
        description="`accelerate launch --config_file`: a name in configs/accelerate/ (single_gpu, multi_gpu_fsdp, "
        "deepspeed_zero3) or a path to a YAML file; None uses accelerate's defaults.",
    )
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description="Save model, optimizer, scheduler and step every this many optimizer steps, and resume from the "
        "last save when a stage is rerun with the same cache key (a retry, a recovered spot job); 0 = never.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="local: CPU threads of each stage process (OMP_NUM_THREADS); None: torch's default, every core. "
        "The count changes floating-point sums, so it is recorded with every stage run.",
    )
    warm_start: bool = Field(
        default=True,
        description="local: fork each single-process stage from a process that has already imported torch, "
        "transformers and MLflow (post_train/executors/warm.py) instead of starting a fresh Python; false: a fresh "
        "`python -m` per stage.",
    )
    # skypilot
    accelerators: Accelerators = Field(
        default="H100:8", description="skypilot: GPUs per node, SkyPilot's `NAME:COUNT`."
    )
    num_nodes: int = Field(
        default=1, ge=1, description="skypilot: nodes of a training stage (evaluation uses one GPU)."
    )
    infra: str | None = Field(
        default=None, description="skypilot: `--infra`, e.g. aws, gcp/us-central1, k8s/my-context."
    )
    use_spot: bool = Field(
        default=False, description="skypilot: spot instances; the managed job recovers from preemptions."
    )
    disk_size: int = Field(default=512, ge=50, description="skypilot: OS disk per node, GB.")
    bucket: str | None = Field(
        default=None, description="skypilot: bucket (s3://..., gs://..., r2://...) mounted at remote_root."
    )
    remote_root: str = Field(
        default="/post-train", description="skypilot: where the bucket is mounted, remotely and locally."
    )
    sky_bin: str = Field(
        default=".sky-venv/bin/sky",
        description="skypilot: the `sky` CLI (`make sky-env` installs it); relative to the repository.",
    )
    task_yaml: str = Field(
        default="sky/stage.yaml", description="skypilot: the task every stage runs as; relative to the repository."
    )
    stages: dict[Literal[STAGES], StagePlacement] = Field(
        default_factory=dict,
        description="Per-stage placement over the settings above, e.g. {evaluate: {backend: local}}.",
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_format(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(BUCKET_SCHEMES):
            raise ValueError(f"{value!r}: expected a bucket URL starting with one of {', '.join(BUCKET_SCHEMES)}")
        return value

    @field_validator("remote_root")
    @classmethod
    def _remote_root_absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "":
            raise ValueError(f"{value!r}: must be an absolute path other than /")
        return value.rstrip("/")

    def for_stage(self, stage: str) -> "ComputeConfig":
        """The settings `stage` runs with: `stages[stage]`'s over the global ones."""
        placement = self.stages.get(stage)
        if placement is None:
            return self
        return self.model_copy(update=placement.model_dump(exclude_unset=True, exclude_none=True))

    @property
    def gpus_per_node(self) -> int:
        _, _, count = self.accelerators.partition(":")
        return int(count) if count else 1

    @property
    def training_processes(self) -> int:
        """Processes of a training stage: one per GPU on every node (skypilot), or `num_processes` (local)."""
        return self.num_nodes * self.gpus_per_node if self.backend == "skypilot" else self.num_processes

    def accelerate_config_path(self, in_repository: bool = False) -> str | None:
        """The accelerate config file: absolute, or relative to the repository (a cloud machine's working directory)."""
        if self.accelerate_config is None:
            return None
        if self.accelerate_config in available_accelerate_configs():
            path = ACCELERATE_CONFIGS_DIR / f"{self.accelerate_config}.yaml"
        else:
            path = Path(self.accelerate_config).resolve()
        if in_repository:
            if not path.is_relative_to(REPO_ROOT):
                raise ConfigError(
                    f"compute.accelerate_config {path} must be inside the repository, which a cloud machine gets"
                )
            return str(path.relative_to(REPO_ROOT))
        return str(path)


class PipelineConfig(StrictModel):
    recipe: str
    scale: str
    description: str = ""
    model: ModelConfig = ModelConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig
    dpo: DPOConfig
    pipeline: Literal["sequential", "joint"] = Field(
        default="sequential",
        description="sequential: SFT, then DPO; joint: (an optional SFT warm-up, then) SFT and DPO in one stage.",
    )
    joint: JointConfig = JointConfig()
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

    @model_validator(mode="after")
    def _evaluation_self_contained(self) -> "PipelineConfig":
        """Resolve the diagnostics' defaults here, so the evaluate stage reads (and is keyed by) its own section."""
        defaults = {
            "diagnostics_max_length": max(self.sft.max_length, self.dpo.max_length),
            "diagnostics_batch_size": self.sft.diagnostics_batch_size,
        }
        unset = {name: value for name, value in defaults.items() if getattr(self.evaluation, name) is None}
        if unset:  # the model is frozen once built; this is still its construction
            object.__setattr__(self, "evaluation", self.evaluation.model_copy(update=unset))
        return self

    def stages_run(self) -> tuple[str, ...]:
        """The training stages after pretraining that this configuration runs, in order."""
        if self.pipeline == "sequential":
            return ("sft", "dpo")
        return ("sft", "joint") if self.joint.start == "sft" else ("joint",)

    @model_validator(mode="after")
    def _kl_budget_measurable(self) -> "PipelineConfig":
        if self.sft.kl_budget is not None and self.sft.kl_budget_metric == "native_kl_to_base" and not self.data.world:
            raise ValueError(
                "sft.kl_budget_metric native_kl_to_base is measured on the demo world's terse format only; "
                "without data.world use kl_to_base"
            )
        return self

    @model_validator(mode="after")
    def _compute_fits(self) -> "PipelineConfig":
        """Batches that split over the processes, and run/cache directories the cloud machines can see."""
        compute = self.compute
        problems = []
        if any(compute.for_stage(stage).backend == "skypilot" for stage in STAGES):
            for name in ("runs_dir", "cache_dir"):
                if not _inside(getattr(self, name), compute.remote_root):
                    problems.append(
                        f"with compute.backend skypilot, {name} ({getattr(self, name)}) must be an absolute path "
                        "inside "
                        f"compute.remote_root ({compute.remote_root}), where the bucket is mounted on every machine"
                    )
        for stage, name, train in (
            ("sft", "sft", self.sft),
            ("dpo", "dpo", self.dpo),
            ("joint", "joint", self.joint),
            ("pretrain", "base_model.train", self.base_model.train),
        ):
            if stage == "pretrain" and self.model.name_or_path is not None:
                continue  # no pretraining stage
            if stage not in self.stages_run():
                continue
            placed = compute.for_stage(stage)
            processes = placed.training_processes
            if train.batch_size % (train.micro_batch_size * processes):
                problems.append(
                    f"{name}.batch_size ({train.batch_size}) must be a multiple of {name}.micro_batch_size x processes "
                    f"({train.micro_batch_size} x {processes}"
                    + (
                        f" = {placed.accelerators} per node x {placed.num_nodes})"
                        if placed.backend == "skypilot"
                        else ")"
                    )
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


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


def _scalar(key: str, text: str) -> Any:
    """A YAML scalar, except that only `true`/`false` are booleans (`no` stays the string "no")."""
    if not text:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r}: not a valid value: {error}") from None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text
    return value


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
            pairs[key.strip()] = value
        overrides = pairs
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = _scalar(dotted, value)
        keys = dotted.split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {key} is a value, not a section")
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
    return validate_config(merged, f"invalid configuration from recipe {recipe_path} at scale {scale_path}")


def validate_config(settings: dict[str, Any], context: str) -> PipelineConfig:
    """`settings` as a `PipelineConfig`, or a ConfigError that starts with `context` and names every bad field."""
    try:
        return PipelineConfig.model_validate(settings)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(map(str, problem['loc'])) or '(top level)'}: {problem['msg']}{_suggestion(problem)}"
            for problem in error.errors()
        )
        raise ConfigError(f"{context}:\n{problems}") from None


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Model`, `Model | None`), if any."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if union else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys_under(path: tuple[Any, ...]) -> list[str]:
    """The keys the section at `path` of a PipelineConfig accepts (none when it is not a section)."""
    annotation: Any = PipelineConfig
    for part in path:
        model = _model_class(annotation)
        if model is not None:
            if part not in model.model_fields:
                return []
            annotation = model.model_fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return []
    model = _model_class(annotation)
    return list(model.model_fields) if model is not None else []


def _suggestion(problem: dict[str, Any]) -> str:
    """For a key the section does not have: the closest one it has (difflib), if any is close."""
    if problem["type"] != "extra_forbidden":
        return ""
    *section, key = problem["loc"]
    close = difflib.get_close_matches(str(key), _keys_under(tuple(section)), n=1)
    return f"; did you mean {'.'.join(map(str, [*section, close[0]]))}?" if close else ""
