"""Log-prob helpers over the vocabulary that never hold fp32 logits for the whole batch.

Logits are often bf16 and ``[B, T, V]`` with ``V`` ~ 150k, so an fp32 copy of the whole
batch can be larger than the model's activations. Both helpers work on ``chunk_size``
token positions at a time and upcast only that chunk.
"""

import torch
from torch import Tensor


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: bf16/fp16 are upcast, fp64 (used by tests) is kept."""
    return torch.promote_types(dtype, torch.float32)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


class _TargetLogProbs(torch.autograd.Function):
    """log_softmax(logits)[target], saving only the logits and one logsumexp per token.

    Autograd through a chunked ``log_softmax`` would save every chunk's fp32 output for the
    backward pass, i.e. the whole fp32 batch after all; recomputing the softmax chunk by
    chunk in ``backward`` avoids that.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        ignored = targets.reshape(-1) < 0
        flat_targets = targets.reshape(-1).clamp_min(0)
        dtype = _working_dtype(logits.dtype)
        logsumexp = torch.empty(flat_targets.shape[0], dtype=dtype, device=logits.device)
        target_logits = torch.empty_like(logsumexp)
        for start in range(0, flat_targets.shape[0], chunk_size):
            chunk = flat_logits[start : start + chunk_size].to(dtype)
            logsumexp[start : start + chunk_size] = torch.logsumexp(chunk, dim=-1)
            target_logits[start : start + chunk_size] = chunk.gather(
                1, flat_targets[start : start + chunk_size, None]
            ).squeeze(1)
        logprobs = (target_logits - logsumexp).masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, flat_targets, ignored, logsumexp)
        ctx.chunk_size = chunk_size
        return logprobs.view(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        logits, flat_targets, ignored, logsumexp = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_grad = grad_output.reshape(-1).to(logsumexp.dtype).masked_fill(ignored, 0.0)
        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_targets.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            chunk = flat_logits[start:stop].to(logsumexp.dtype)
            grad = flat_grad[start:stop, None]
            # d/dz_v [z_y - logsumexp(z)] = 1[v = y] - softmax(z)_v
            chunk_grad = -torch.exp(chunk - logsumexp[start:stop, None]) * grad
            chunk_grad.scatter_add_(1, flat_targets[start:stop, None], grad)
            grad_logits[start:stop] = chunk_grad
        return grad_logits.view(logits.shape), None, None


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """Log-probs of the target tokens, ``log_softmax(logits)[..., targets]``.

    Args:
        logits: ``[B, T, V]`` in any float dtype (already aligned with ``targets``: the
            logits at position t predict ``targets[:, t]``).
        targets: ``[B, T]`` long token ids. Negative ids (HF's ``-100`` ignore index) get
            log-prob 0 and no gradient, so labels can be passed as they are.
        chunk_size: token positions upcast at once, in forward and in backward.

    Returns:
        ``[B, T]`` log-probs in fp32 (fp64 if the logits are fp64), differentiable w.r.t.
        ``logits``; the gradient has the logits' dtype.
    """
    _check_chunk_size(chunk_size)
    return _TargetLogProbs.apply(logits, targets, chunk_size)


@torch.no_grad()
def token_entropy_and_kl(
    logits: Tensor, ref_logits: Tensor | None, chunk_size: int = 1024
) -> tuple[Tensor, Tensor | None]:
    """Per-position entropy ``H(π)`` and exact ``KL(π ‖ π_ref)`` over the vocabulary.

    Diagnostics only (objectives.md, "Diagnostics that follow from the theory"), so the
    results carry no gradient. ``logits`` and ``ref_logits`` are ``[B, T, V]`` at the same
    positions; returns two ``[B, T]`` fp32 tensors (fp64 for fp64 input), the KL being
    ``None`` when ``ref_logits`` is ``None``.
    """
    _check_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_ref = None if ref_logits is None else ref_logits.reshape(-1, vocab)
    dtype = _working_dtype(logits.dtype)
    entropy = torch.empty(flat_logits.shape[0], dtype=dtype, device=logits.device)
    kl = None if flat_ref is None else torch.empty_like(entropy)
    for start in range(0, flat_logits.shape[0], chunk_size):
        stop = start + chunk_size
        logp = torch.log_softmax(flat_logits[start:stop].to(dtype), dim=-1)
        p = logp.exp()
        entropy[start:stop] = -(p * logp).sum(-1)
        if flat_ref is not None:
            ref_logp = torch.log_softmax(flat_ref[start:stop].to(dtype), dim=-1)
            kl[start:stop] = (p * (logp - ref_logp)).sum(-1)
    shape = logits.shape[:-1]
    return entropy.view(shape), None if kl is None else kl.view(shape)
