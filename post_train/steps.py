"""The micro-batch steps of the training stages, one per kind of batch, shared by the stages that train on it:
an SFT objective on demonstrations (SFT, joint) and a preference loss on chosen/rejected pairs (DPO, joint)."""

from __future__ import annotations

from typing import Any

import torch

from losses import PairLogps, PreferenceLoss, SFTObjective, preference_metrics
from post_train.modeling import batch_collate, sequence_sums, target_logprobs, target_logprobs_and_reference_kl
from post_train.training import RolloutFn, StepFn, StepOutput


def objective_step(objective: SFTObjective, fused_logprobs: bool, reference: torch.nn.Module | None = None) -> StepFn:
    """One micro-batch of SFT with `objective`: its summed loss and the summed token weights, and for an objective
    that needs the reference's distribution (run from `reference`, the frozen base) the summed `anchor_kl`,
    KL(π_base ‖ π_θ) on the training tokens."""
    if objective.needs_ref_distribution and reference is None:
        raise ValueError(f"SFT objective {objective.name!r} needs the reference model; none was given")

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        ref_kl, metrics = None, {}
        if objective.needs_ref_distribution:
            logps, ref_kl, mask = target_logprobs_and_reference_kl(model, reference, batch, fused_logprobs)
            metrics["anchor_kl"] = ref_kl.sum().detach()  # 0 off the mask
        else:
            logps, mask = target_logprobs(model, batch, fused_logprobs)
        old_logps = None
        if objective.needs_old:
            # Absent on a rollout's first step, whose weights are still the old policy's: this pass's own log-probs.
            old_logps = batch.get("old_logps", logps.detach())
        out = objective(logps, mask, ref_logps=batch.get("ref_logps"), old_logps=old_logps, ref_kl=ref_kl)
        metrics["mean_token_weight"] = out.weights.sum().detach()
        return StepOutput(out.loss * mask.sum(), metrics)

    return step


def old_policy_snapshot(fused_logprobs: bool) -> RolloutFn:
    """PSFT's old policy: the log-probs of a rollout's batches under the weights before its steps.

    The first step's batches are skipped, as `objective_step` reuses its own pass there, so the extra
    forward costs (K-1)/K of one instead of a whole one.
    """

    @torch.no_grad()
    def snapshot(model: torch.nn.Module, rollout: list[list[dict[str, Any]]]) -> None:
        for group in rollout[1:]:
            for batch in group:
                batch["old_logps"] = target_logprobs(model, batch, fused_logprobs)[0]

    return snapshot


def pair_collate(padding_free: bool, pad_token_id: int):
    """2B sequences (chosen, then rejected), packed or padded, plus the pairs' reference log-probs when known."""
    sequences = batch_collate(padding_free, pad_token_id)

    def collate(pairs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = sequences([pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs])
        if "ref_chosen" in pairs[0]:
            batch["ref_chosen"] = torch.tensor([pair["ref_chosen"] for pair in pairs])
            batch["ref_rejected"] = torch.tensor([pair["ref_rejected"] for pair in pairs])
        batch["num_units"] = len(pairs)
        return batch

    return collate


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, Any], fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of the chosen and rejected halves."""
    logps, mask = target_logprobs(model, batch, fused)
    sums = sequence_sums(logps * mask, batch)
    lengths = sequence_sums(mask.to(logps.dtype), batch)
    half = sums.shape[0] // 2
    return sums[:half], sums[half:], lengths[:half], lengths[half:]


def preference_step(loss: PreferenceLoss, fused_logprobs: bool) -> StepFn:
    """One micro-batch of pairs (`pair_collate`) with preference `loss`: its summed loss and TRL's metrics."""

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        chosen, rejected, chosen_lengths, rejected_lengths = sequence_logps(model, batch, fused_logprobs)
        out = loss(
            PairLogps(
                chosen,
                rejected,
                batch.get("ref_chosen"),
                batch.get("ref_rejected"),
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
        )
        pairs_in_batch = chosen.shape[0]
        sums = {name: value * pairs_in_batch for name, value in preference_metrics(out).items()}
        sums["logps/chosen"] = chosen.detach().sum()
        sums["logps/rejected"] = rejected.detach().sum()
        return StepOutput(out.losses.sum(), sums)

    return step
