"""What one benchmark process measures about itself, through PyTorch's global hooks only.

Neither trainer is changed or wrapped. Two process-wide hooks observe them:
- a forward pre-hook on every `nn.Embedding` call made with gradients enabled: the trained
  model's forward passes (frozen models, reference passes, PSFT's old-policy pass and the
  diagnostics run without gradients and are not counted). It counts the non-pad tokens and,
  splitting the rows at <|bos|> (every sequence starts with one, packed or not), the sum of
  squared sequence lengths that the attention term of the FLOPs count needs;
- a post-hook on every optimizer step: the step boundaries (after a device synchronisation on
  a GPU).

Steady state is the window from the end of optimizer step `warmup_steps` to the end of the last
step: the time between those two boundaries and the tokens of the forward passes in between.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from post_train.provenance import cpu_model, git_commit


@dataclass
class StepMeter:
    pad_token_id: int
    bos_token_id: int
    device: str
    step_ends: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_squared_lengths: list[int] = field(default_factory=list)
    _tokens: torch.Tensor | int = 0
    _squared_lengths: torch.Tensor | int = 0
    _handles: list = field(default_factory=list)

    def install(self) -> "StepMeter":
        self._handles = [
            register_module_forward_pre_hook(self._on_forward),
            register_optimizer_step_post_hook(self._on_step),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_forward(self, module: torch.nn.Module, inputs: tuple) -> None:
        if not isinstance(module, torch.nn.Embedding) or not torch.is_grad_enabled() or not inputs:
            return
        ids = inputs[0].detach().reshape(-1)
        real = ids != self.pad_token_id
        index = torch.arange(ids.numel(), device=ids.device)
        # Position of each token in its sequence: distance to the last <|bos|> at or before it.
        start = torch.where(ids == self.bos_token_id, index, torch.zeros_like(index)).cummax(0).values
        position = index - start
        # Σ over a sequence's tokens of (2·position + 1) is its length squared.
        self._tokens = self._tokens + real.sum()
        self._squared_lengths = self._squared_lengths + ((2 * position + 1) * real).sum()

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_tokens.append(int(self._tokens))
        self.step_squared_lengths.append(int(self._squared_lengths))
        self._tokens, self._squared_lengths = 0, 0

    def steady_state(self, warmup_steps: int) -> dict[str, float]:
        """Tokens per second over the steps after the first `warmup_steps`."""
        steps = len(self.step_ends)
        if not 1 <= warmup_steps < steps:
            raise RuntimeError(
                f"{steps} optimizer steps observed; the window needs 1 <= warmup_steps ({warmup_steps}) < steps"
            )
        seconds = self.step_ends[-1] - self.step_ends[warmup_steps - 1]
        tokens = sum(self.step_tokens[warmup_steps:])
        return {
            "steps": steps,
            "measured_steps": steps - warmup_steps,
            "measured_seconds": seconds,
            "measured_tokens": tokens,
            "measured_squared_lengths": sum(self.step_squared_lengths[warmup_steps:]),
            "tokens_per_second": tokens / seconds,
            "tokens_per_step": [int(count) for count in self.step_tokens],
        }


def peak_memory_bytes(device: str) -> int:
    """The process's RSS high-water mark on the CPU; the allocator's peak on a GPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes


def resident_bytes() -> int:
    """The current RSS (Linux), to tell what imports alone take from the peak."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def machine(device: str, threads: int, repository: Path) -> dict[str, object]:
    """Where and with what the numbers were taken."""
    import accelerate
    import transformers
    import trl

    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": threads,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "post_train_commit": git_commit(repository, short=True, mark_dirty=True),
        "load_average": os.getloadavg()[0],
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
