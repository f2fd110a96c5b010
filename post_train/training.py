"""The one training loop, shared by pretraining, SFT and DPO.

Stages differ only in `step_fn`, which turns a micro-batch into a *summed* loss over its
units (tokens for SFT, pairs for DPO). The loop divides by the unit count of the whole
optimizer step across micro-batches and processes, so gradient accumulation and data
parallelism give the gradient of the global token (or pair) mean, not a mean of means.
A micro-batch made of several parts (joint SFT+DPO: demonstrations and pairs) counts its units
per part, and the step's loss is the weighted sum of each part's global mean.

It runs unchanged on one process, under `accelerate launch` with DDP, FSDP or DeepSpeed
ZeRO-3, and on several nodes. With `checkpoint_dir` and `checkpoint_every`, it saves its
state (`accelerator.save_state`: model, optimizer, RNG; plus, as JSON, the step, the scheduler,
the divergence guard's running loss and the metrics so far) and resumes from the last complete
save. The data order depends only on the seed, and a step's global batch is the same at any
number of processes, so a run resumes at a different world size (DDP; FSDP with
SHARDED_STATE_DICT) where it left off.

Resuming unpickles nothing that can run code: the scheduler is not registered with accelerate (whose
`custom_checkpoint_<n>.pkl` it loads with `weights_only=False`); accelerate reads the optimizer and
RNG files with torch's `weights_only=True` loader, which builds tensors and plain containers only.

Every step is checked before its update is applied (`DivergenceGuard`): a non-finite loss or
gradient norm, or a loss far above its running level, raises `TrainingDiverged`, so no save after
the last good step is ever written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from post_train.config import TrainConfig
from post_train.errors import TrainingDiverged
from post_train.run_summary import metrics_line


@dataclass
class StepOutput:
    loss_sum: torch.Tensor | dict[str, torch.Tensor]
    """The objective summed over the micro-batch's units; differentiable. For a batch of parts (its `num_units` a
    mapping), one sum per part."""
    metric_sums: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Other per-unit quantities summed over the micro-batch, logged as global means (detached tensors are
    read only when the step is logged, so a step needs no host sync for them); in a batch of parts, a name
    `<part>/...` is a mean over that part's units."""


StepFn = Callable[[torch.nn.Module, dict[str, Any]], StepOutput]
RolloutFn = Callable[[torch.nn.Module, list[list[dict[str, Any]]]], None]
LogFn = Callable[[dict[str, float], int], None]
DiagnosticsFn = Callable[[torch.nn.Module], dict[str, float]]

WHOLE = ""
"""The one part of a batch whose `num_units` is a plain count."""


def by_part(value: Any) -> dict[str, Any]:
    """A batch's `num_units` (or a step's `loss_sum`) as a mapping from part to value."""
    return dict(value) if isinstance(value, dict) else {WHOLE: value}


class LearningRateControl(Protocol):
    """Scales the schedule's learning rate from what the diagnostics measure (`post_train.kl_budget`)."""

    multiplier: float

    def observe(self, diagnostics: dict[str, float]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


def make_accelerator(mixed_precision: str) -> Accelerator:
    """`auto` takes bf16 on a GPU that supports it and full precision elsewhere (CPU).

    Without a GPU, several processes (`accelerate launch`, torchrun) train on the CPU with gloo;
    accelerate would otherwise run each of them as an independent single process.
    """
    if mixed_precision == "auto":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16_ok else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """Frozen models (SFT's base, DPO's reference) in bf16 when training in bf16: an 8B model then
    takes 16 GB per GPU instead of 32 (they are not sharded). Otherwise full precision."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def accumulation_steps(config: TrainConfig, num_processes: int) -> int:
    per_step = config.micro_batch_size * num_processes
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({config.micro_batch_size} x {num_processes})"
        )
    return config.batch_size // per_step


LEVEL_SMOOTHING = 0.9


@dataclass
class DivergenceGuard:
    """Refuses a step whose loss or gradient norm is not finite, or whose loss is more than `factor` times the
    running level: an exponential average (weight `LEVEL_SMOOTHING` on the past) of the earlier steps' losses.

    A level that is not positive (some f-divergence and PSFT objectives go below zero) gives no scale to
    compare with: such a loss is only checked for being finite.
    """

    description: str
    factor: float | None
    level: float | None = None

    def check(self, step: int, loss: float, grad_norm: float | None) -> None:
        if not math.isfinite(loss):
            self._stop(f"the loss is {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            self._stop(f"the gradient norm is {grad_norm} at step {step} (loss {loss:.6g})")
        if self.factor is not None and self.level is not None and self.level > 0 and loss > self.factor * self.level:
            self._stop(
                f"the loss {loss:.6g} at step {step} is more than {self.factor:g} times its running level "
                f"{self.level:.6g} (divergence_factor; null turns this check off)"
            )
        self.level = loss if self.level is None else LEVEL_SMOOTHING * self.level + (1 - LEVEL_SMOOTHING) * loss

    def _stop(self, what: str) -> None:
        raise TrainingDiverged(
            f"{self.description} diverged: {what}. The step was not applied and no save after the last good step "
            "was written; lower the learning rate and run again"
        )


def shuffled_loader(dataset: Sequence[Any], collate: Callable[[list[Any]], Any], config: TrainConfig) -> DataLoader:
    """Micro-batches of `dataset` in the order the seed gives, the same in every run."""
    return DataLoader(
        dataset,
        batch_size=config.micro_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )


def planned_steps(config: TrainConfig, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps of a run: `max_steps`, else `epochs` times the whole steps in a process's epoch."""
    return config.max_steps or max(1, batches_per_epoch // accumulation) * config.epochs


def rows_drawn(size: int, config: TrainConfig, accelerator: Accelerator, rollout_steps: int = 1) -> list[int]:
    """The indices (sorted) of the rows of a `size`-row dataset that `train` will put in a micro-batch, on any
    process: the same loader over the row indices, prepared by `accelerator` and drawn as `train` draws it (whole
    rollouts, and the micro-batch accelerate's loader reads ahead). Every process must call it."""
    seen: set[int] = set()

    def record(indices: list[int]) -> list[int]:
        seen.update(indices)
        return indices

    loader = accelerator.prepare_data_loader(shuffled_loader(range(size), record, config), device_placement=False)
    accumulation = accumulation_steps(config, accelerator.num_processes)
    steps = planned_steps(config, len(loader), accumulation)
    batches = _endless(loader)
    for _ in range(math.ceil(steps / rollout_steps) * rollout_steps * accumulation):
        next(batches)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        seen = set().union(*gather_object([seen]))
    return sorted(seen)


def _endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(
    model: torch.nn.Module,
    dataset: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    step_fn: StepFn,
    config: TrainConfig,
    accelerator: Accelerator,
    *,
    on_log: LogFn | None = None,
    diagnostics: DiagnosticsFn | None = None,
    diagnostics_every: int = 0,
    before_rollout: RolloutFn | None = None,
    rollout_steps: int = 1,
    part_weights: Mapping[str, float] | None = None,
    lr_control: LearningRateControl | None = None,
    description: str = "train",
    checkpoint_dir: Path | str | None = None,
    checkpoint_every: int = 0,
    gradient_checkpointing: bool = False,
) -> list[dict[str, float]]:
    """Train `model` in place; returns the logged metrics, one dict per logged step.

    Batches are drawn `rollout_steps` optimizer steps at a time and handed to
    `before_rollout` first, with the weights as they are before those steps: PSFT's old
    policy (arXiv 2508.17784) is computed there.

    With `checkpoint_dir` and `checkpoint_every` > 0 the state is saved at the first rollout
    boundary at least `checkpoint_every` steps after the last save, and a run that finds a
    complete save there continues from it (the metrics logged before it are passed to
    `on_log` again, so a new tracking run holds the whole curve).

    `part_weights` weighs the parts of a batch of parts (default 1 each). `lr_control`, consulted after each
    diagnostics run, scales the scheduled learning rate by its `multiplier` from the next step on.
    """
    torch.manual_seed(config.seed)
    loader = shuffled_loader(dataset, collate, config)
    accumulation = accumulation_steps(config, accelerator.num_processes)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        # DeepSpeed steps the optimizer inside `backward` and divides the loss by its own
        # accumulation count: give it ours, and the gradient clipping, before `prepare`.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            {
                "gradient_accumulation_steps": accumulation,
                "train_micro_batch_size_per_gpu": config.micro_batch_size,
                "train_batch_size": config.batch_size,
                "gradient_clipping": config.max_grad_norm,
            }
        )
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = planned_steps(config, len(loader), accumulation)
    # Not passed to accelerator.prepare: it would step the schedule once per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    weights = dict(part_weights or {})
    history: list[dict[str, float]] = []
    batches = _endless(loader)
    first_step = 1
    guard = DivergenceGuard(description, config.divergence_factor)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None and checkpoint_every > 0 else None
    if checkpoints is not None:
        resumed = latest_checkpoint(checkpoints)
        if resumed is not None:
            state = json.loads((resumed / TRAINER_STATE).read_text())
            accelerator.load_state(str(resumed))
            scheduler.load_state_dict(state["scheduler"])
            guard.level = state["loss_level"]
            if lr_control is not None:
                lr_control.load(state["lr_control"])
            history = state["history"]
            first_step = state["step"] + 1
            for _ in range(state["step"] * accumulation):  # the same batches, in the same order, as before the save
                next(batches)
            if on_log is not None and accelerator.is_main_process:
                for entry in history:
                    on_log({k: v for k, v in entry.items() if k != "step"}, int(entry["step"]))
    last_saved = first_step - 1
    model.train()
    progress = tqdm(range(first_step, total_steps + 1), desc=description, disable=not accelerator.is_main_process)
    started = time.perf_counter()
    tokens_seen = 0
    rollout: list[list[dict[str, Any]]] = []
    for step in progress:
        if not rollout:
            rollout = [[next(batches) for _ in range(accumulation)] for _ in range(rollout_steps)]
            if before_rollout is not None:
                before_rollout(model, rollout)
        group = rollout.pop(0)
        local_units: dict[str, int] = defaultdict(int)
        for batch in group:
            for part, count in by_part(batch["num_units"]).items():
                local_units[part] += int(count)
        parts = sorted(local_units)
        counted = accelerator.reduce(torch.tensor([local_units[p] for p in parts], device=accelerator.device), "sum")
        global_units = {part: max(int(count), 1) for part, count in zip(parts, counted.tolist())}
        # Each process's summed loss x processes / global units: DDP's gradient averaging over
        # processes then gives the gradient of the global token (or pair) mean.
        scales = {
            part: weights.get(part, 1.0) * accelerator.num_processes / units * (accumulation if deepspeed else 1)
            for part, units in global_units.items()
        }
        sums: dict[str, float | torch.Tensor] = defaultdict(float)
        step_tokens = 0
        for index, batch in enumerate(group):
            is_last = index == len(group) - 1
            if deepspeed:  # DeepSpeed's accumulation boundary is the step's last micro-batch
                accelerator.gradient_state._set_sync_gradients(is_last)
            with nullcontext() if is_last else accelerator.no_sync(model):
                out = step_fn(model, batch)
                losses = by_part(out.loss_sum)
                accelerator.backward(sum(scales[part] * loss for part, loss in losses.items()))
            for part, loss in losses.items():
                sums[_loss_name(part)] += loss.detach()
            for name, value in out.metric_sums.items():
                sums[name] += value
            step_tokens += batch["num_tokens"]
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        # One host sync per step: every process gets the same global loss and norm, so all stop together.
        weighted = sum(
            weights.get(part, 1.0) * torch.as_tensor(sums[_loss_name(part)], dtype=torch.float64) / global_units[part]
            for part in parts
        )
        checked = [accelerator.reduce(weighted.to(accelerator.device), "sum")]
        if grad_norm is not None:  # DeepSpeed clips inside its own step and reports no norm here
            checked.append(torch.as_tensor(grad_norm, dtype=torch.float64).to(accelerator.device))
        step_loss, *step_norm = torch.stack(checked).tolist()
        guard.check(step, step_loss, step_norm[0] if step_norm else None)
        if lr_control is not None:
            for group_settings, scheduled in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group_settings["lr"] = scheduled * lr_control.multiplier
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens

        edge = step in (1, total_steps)
        run_diagnostics = diagnostics is not None and diagnostics_every > 0 and (step % diagnostics_every == 0 or edge)
        if run_diagnostics or step % config.log_every == 0 or edge:
            names = sorted(sums)
            local = torch.stack([torch.as_tensor(sums[n], dtype=torch.float64).to(accelerator.device) for n in names])
            totals = accelerator.reduce(local, "sum")
            metrics = {
                name: value / global_units[_part_of(name, global_units)] for name, value in zip(names, totals.tolist())
            }
            metrics["loss"] = step_loss
            metrics["learning_rate"] = learning_rate
            metrics["grad_norm"] = step_norm[0] if step_norm else float("nan")
            elapsed = time.perf_counter() - started
            metrics["tokens_per_second"] = tokens_seen * accelerator.num_processes / max(elapsed, 1e-9)
            if run_diagnostics:
                # The prepared model, on every process: under FSDP the unwrapped module holds only a shard.
                metrics.update(diagnostics(model))
                model.train()
                if lr_control is not None:  # every process measured the same model: the multipliers agree
                    lr_control.observe(metrics)
            if lr_control is not None:
                metrics["lr_multiplier"] = lr_control.multiplier
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if accelerator.is_main_process:  # a whole line, which a log (Prefect's) keeps, unlike the bar's redraws
                progress.write(f"{description} step {step}/{total_steps}: {metrics_line(metrics)}")
            metrics["step"] = step
            history.append(metrics)
            if on_log is not None and accelerator.is_main_process:
                on_log({k: v for k, v in metrics.items() if k != "step"}, step)
        if checkpoints is not None and not rollout and step < total_steps and step - last_saved >= checkpoint_every:
            save_training_state(
                accelerator,
                checkpoints,
                step,
                {
                    "history": history,
                    "scheduler": scheduler.state_dict(),
                    "loss_level": guard.level,
                    "lr_control": lr_control.state() if lr_control is not None else None,
                },
            )
            last_saved = step
    progress.close()
    model.eval()
    return history


def _loss_name(part: str) -> str:
    """A part's summed loss is logged as `<part>/loss` (its mean); the step's weighted total as `loss`."""
    return f"{part}/loss" if part else "loss"


def _part_of(metric: str, global_units: Mapping[str, int]) -> str:
    """The part whose units a summed metric is a mean over: its name's first segment, when that is a part."""
    head = metric.partition("/")[0]
    return head if head in global_units else next(iter(global_units))


TRAINER_STATE = "trainer_state.json"
"""Written last into a checkpoint directory: its presence marks the save complete."""


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete save with the highest step under `directory`, if any."""
    complete = [path for path in directory.glob("step-*") if (path / TRAINER_STATE).is_file()]
    return max(complete, key=lambda path: int(path.name.removeprefix("step-")), default=None)


def save_training_state(accelerator: Accelerator, directory: Path, step: int, trainer_state: dict[str, Any]) -> Path:
    """`accelerator.save_state` (every process takes part) into `step-<step>`, then `trainer_state` and the step as
    JSON, which marks the save complete; older saves are removed after."""
    target = directory / f"step-{step}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (target / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
        for older in directory.glob("step-*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory: Path) -> Path:
    """Model (safetensors) and tokenizer, written by the main process only.

    The full state dict is gathered on every process first: under FSDP or ZeRO-3 each process
    holds only a shard, and gathering is a collective.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()
    return directory
