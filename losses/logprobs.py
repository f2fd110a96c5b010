"""Log-prob helpers over the vocabulary that never hold fp32 logits for the whole batch.

Logits are often bf16 and ``[B, T, V]`` with ``V`` ~ 150k, so an fp32 copy of the whole
batch can be larger than the model's activations. Every op here works on ``chunk_size``
token positions at a time and upcasts only that chunk; ``fused_target_logprobs`` goes further
and never builds the logits at all.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: bf16/fp16 are upcast, fp64 (used by tests) is kept."""
    return torch.promote_types(dtype, torch.float32)


# On CPU, 256 to 8192 positions per chunk (V=16k, H=256) run forward+backward in the same time, within noise;
# on GPU 1024 rows keep the vocabulary matmul efficient while one fp32 chunk of a 128k vocabulary is 512 MiB.
CHUNK_SIZE = 1024


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


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = CHUNK_SIZE) -> Tensor:
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


def _chunk_logits(rows: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``rows @ weight.T + bias`` upcast to ``dtype``; the matmul runs in the weight's dtype, as ``lm_head`` does."""
    return torch.nn.functional.linear(rows.to(weight.dtype), weight, bias).to(dtype)


def _output_layer_backward(
    ctx,
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    counted: Tensor,
    dtype: torch.dtype,
    chunk_grad: Callable[[int, int, Tensor], Tensor],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``∂hidden``, ``∂W``, ``∂b`` of ``z = rows W^T + b`` (``rows = hidden[counted]``), chunk by chunk:
    ``chunk_grad(start, stop, z)`` turns the recomputed fp32 logits of rows ``start:stop`` into ``∂z``, in place."""
    wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
    grad_rows = torch.empty_like(rows) if wants_hidden else None
    # Summed over chunks in the working dtype, so that bf16 weights are rounded once, at the end.
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if wants_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if wants_bias else None
    for start in range(0, rows.shape[0], ctx.chunk_size):
        stop = start + ctx.chunk_size
        chunk = rows[start:stop]
        grad_logits = chunk_grad(start, stop, _chunk_logits(chunk, weight, bias, dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        grad_logits = grad_logits.to(weight.dtype)
        if grad_rows is not None:
            grad_rows[start:stop] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight += grad_logits.T @ chunk.to(weight.dtype)
        del grad_logits  # before the next chunk's logits exist, so that only one chunk is ever alive
    grad_hidden = None
    if grad_rows is not None:
        grad_hidden = torch.zeros(ctx.hidden_shape, dtype=rows.dtype, device=rows.device)
        grad_hidden[counted] = grad_rows
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class _FusedTargetLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] without the logits: see ``fused_target_logprobs``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int) -> Tensor:
        counted = targets >= 0
        rows, row_targets = hidden[counted], targets[counted]
        dtype = _working_dtype(weight.dtype)
        logsumexp = torch.empty(rows.shape[0], dtype=dtype, device=hidden.device)
        target_logits = torch.empty_like(logsumexp)
        for start in range(0, rows.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(rows[start:stop], weight, bias, dtype)
            target_logits[start:stop] = logits.gather(1, row_targets[start:stop, None]).squeeze(1)
            # torch.logsumexp would allocate another chunk; the logits are not needed after it.
            maxima = logits.amax(dim=-1, keepdim=True)
            logsumexp[start:stop] = logits.sub_(maxima).exp_().sum(dim=-1).log_() + maxima.squeeze(1)
            del logits  # before the next chunk's logits exist, so that only one chunk is ever alive
        logprobs = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
        logprobs[counted] = target_logits - logsumexp
        ctx.save_for_backward(rows, weight, bias, row_targets, counted, logsumexp)
        ctx.chunk_size = chunk_size
        ctx.hidden_shape = hidden.shape
        return logprobs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        rows, weight, bias, row_targets, counted, logsumexp = ctx.saved_tensors
        grad = grad_output[counted].to(logsumexp.dtype)[:, None]

        def chunk_grad(start: int, stop: int, logits: Tensor) -> Tensor:
            # d/dz_v [z_y - logsumexp(z)] = 1[v = y] - softmax(z)_v
            logits.sub_(logsumexp[start:stop, None]).exp_().mul_(-grad[start:stop])
            return logits.scatter_add_(1, row_targets[start:stop, None], grad[start:stop])

        return (*_output_layer_backward(ctx, rows, weight, bias, counted, logsumexp.dtype, chunk_grad), None, None)


def fused_target_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk_size: int = CHUNK_SIZE
) -> Tensor:
    """Log-probs of the target tokens straight from the last hidden states, ``log_softmax(h W^T + b)[y]``.

    The output projection and the log-softmax are one op that never holds the ``[N, V]`` logits: the idea
    behind Liger Kernel's fused linear cross-entropy (Hsu et al., arXiv 2410.10989). Forward takes
    ``chunk_size`` positions at a time, ``z = h_c W^T + b``, and keeps only ``logsumexp(z)`` and ``z_y``
    per position; backward recomputes each chunk's ``z`` and, with ``G = g · (onehot(y) - softmax(z))``
    for the upstream gradient ``g``, accumulates ``∂h_c = G W``, ``∂W += G^T h_c`` and ``∂b += Σ_c G``.

    Memory: the unfused path (``lm_head`` then ``token_logprobs``) keeps ``[N, V]`` logits in the model's
    dtype for backward and builds an ``[N, V]`` gradient for them (``N·V·4`` bytes in bf16, 8 GiB for
    16k positions of a 128k vocabulary). Here the saved state is the counted rows of ``hidden``
    (``N·H``) and one logsumexp per position; the working set is one fp32 ``[chunk_size, V]`` chunk,
    plus, in backward, an fp32 ``[V, H]`` accumulator for ``∂W``. Ignored positions cost nothing:
    they are dropped before the matmuls.

    The matmul runs in the weight's dtype (as ``lm_head`` does; under autocast, autocast's dtype, in
    forward and backward) and each chunk of logits is upcast to at least fp32 (fp64 is kept) for the
    softmax. A ``weight`` tied with the input embedding is an ordinary Parameter: both uses add to
    its ``.grad``.

    Args:
        hidden: ``[..., H]`` last hidden states, after the final norm, aligned with ``targets``
            (the state at position t predicts ``targets[..., t]``).
        weight: ``[V, H]`` output projection (``lm_head.weight``).
        targets: ``[...]`` long token ids. Negative ids (HF's ``-100``) get log-prob 0 and no gradient.
        bias: optional ``[V]`` output bias.
        chunk_size: positions whose logits exist at once, in forward and in backward.

    Returns:
        ``[...]`` log-probs in at least fp32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``;
        their gradients have their own dtypes.
    """
    _check_chunk_size(chunk_size)
    return _FusedTargetLogProbs.apply(hidden, weight, bias, targets, chunk_size)


def _kl_chunk(logits: Tensor, ref_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``KL(softmax(ref_logits) ‖ softmax(logits))`` per row, with both rows' logsumexps; consumes both buffers.

    ``KL = Σ_v p_v (log p_v - log q_v)`` with ``log p - log q = (z_ref - z) - (lse(z_ref) - lse(z))``: the
    difference is formed per entry before the ``p``-weighted sum, so large logits cancel before summing.
    """
    logsumexp = torch.logsumexp(logits, dim=-1)
    ref_logsumexp = torch.logsumexp(ref_logits, dim=-1)
    log_ratio = logits.neg_().add_(ref_logits).sub_((ref_logsumexp - logsumexp)[:, None])
    ref_probs = ref_logits.sub_(ref_logsumexp[:, None]).exp_()
    # In place, so no third [chunk, V] buffer (and no matmul, which autocast would run in bf16).
    kl = log_ratio.mul_(ref_probs).sum(dim=-1)
    return kl, logsumexp, ref_logsumexp


def _kl_chunk_grad(
    logits: Tensor, ref_logits: Tensor, logsumexp: Tensor, ref_logsumexp: Tensor, grad: Tensor
) -> Tensor:
    """``g · (softmax(z) - softmax(z_ref))``, the gradient of ``g · KL(softmax(z_ref) ‖ softmax(z))`` w.r.t. ``z``.

    ``KL = Σ_v p_v log p_v - Σ_v p_v z_v + lse(z)``, so ``∂KL/∂z_v = q_v - p_v``. Built in ``logits``' buffer.
    """
    probs = logits.sub_(logsumexp[:, None]).exp_()
    ref_probs = ref_logits.sub_(ref_logsumexp[:, None]).exp_()
    return probs.sub_(ref_probs).mul_(grad[:, None])


class _ReferenceKL(torch.autograd.Function):
    """KL(softmax(ref_logits) ‖ softmax(logits)) per row, saving besides both logits one logsumexp pair per row
    (autograd through chunked softmaxes would save an fp32 copy of each chunk): see ``token_reference_kl``."""

    @staticmethod
    def forward(ctx, logits: Tensor, ref_logits: Tensor, chunk_size: int) -> Tensor:
        dtype = torch.promote_types(_working_dtype(logits.dtype), _working_dtype(ref_logits.dtype))
        rows = logits.shape[0]
        kl = torch.empty(rows, dtype=dtype, device=logits.device)
        logsumexp, ref_logsumexp = torch.empty_like(kl), torch.empty_like(kl)
        for start in range(0, rows, chunk_size):
            stop = start + chunk_size
            kl[start:stop], logsumexp[start:stop], ref_logsumexp[start:stop] = _kl_chunk(
                logits[start:stop].to(dtype, copy=True), ref_logits[start:stop].to(dtype, copy=True)
            )
        ctx.save_for_backward(logits, ref_logits, logsumexp, ref_logsumexp)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        logits, ref_logits, logsumexp, ref_logsumexp = ctx.saved_tensors
        dtype = logsumexp.dtype
        grad = grad_output.to(dtype)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            grad_logits[start:stop] = _kl_chunk_grad(
                logits[start:stop].to(dtype, copy=True),
                ref_logits[start:stop].to(dtype, copy=True),
                logsumexp[start:stop],
                ref_logsumexp[start:stop],
                grad[start:stop],
            )
        return grad_logits, None, None


def token_reference_kl(logits: Tensor, ref_logits: Tensor, chunk_size: int = CHUNK_SIZE) -> Tensor:
    """``KL(π_ref(·|s) ‖ π_θ(·|s))`` over the whole vocabulary, per position, from both models' logits.

    The unfused counterpart of ``fused_target_logprobs_and_reference_kl``'s KL, for models whose output layer
    cannot be fused (``post_train.modeling.fusable_output_layer``): the logits exist already, and only ``chunk_size``
    positions of them are upcast at once, in forward and in backward; the saved state is the logits
    themselves and two logsumexps per position.

    Args:
        logits: ``[N, V]`` policy logits, any float dtype.
        ref_logits: ``[N, V]`` reference logits at the same positions; they get no gradient.
        chunk_size: positions upcast at once.

    Returns:
        ``[N]`` in at least fp32, differentiable w.r.t. ``logits`` (gradient ``g · (softmax(z) - softmax(z_ref))``,
        in the logits' dtype).
    """
    _check_chunk_size(chunk_size)
    return _ReferenceKL.apply(logits, ref_logits.detach(), chunk_size)


class _FusedTargetLogProbsAndReferenceKL(torch.autograd.Function):
    """``log π_θ(y)`` and ``KL(π_ref ‖ π_θ)`` per counted position from both models' last hidden states, one pass
    over the policy's output layer for both: see ``fused_target_logprobs_and_reference_kl``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        counted = targets >= 0
        rows, ref_rows, row_targets = hidden[counted], ref_hidden[counted], targets[counted]
        dtype = torch.promote_types(_working_dtype(weight.dtype), _working_dtype(ref_weight.dtype))
        kl = torch.empty(rows.shape[0], dtype=dtype, device=hidden.device)
        logsumexp, ref_logsumexp, target_logits = torch.empty_like(kl), torch.empty_like(kl), torch.empty_like(kl)
        for start in range(0, rows.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(rows[start:stop], weight, bias, dtype)
            target_logits[start:stop] = logits.gather(1, row_targets[start:stop, None]).squeeze(1)
            kl[start:stop], logsumexp[start:stop], ref_logsumexp[start:stop] = _kl_chunk(
                logits, _chunk_logits(ref_rows[start:stop], ref_weight, ref_bias, dtype)
            )
            del logits  # _kl_chunk consumed it; freed before the next chunk's logits exist
        logprobs = torch.zeros(counted.shape, dtype=dtype, device=hidden.device)
        logprobs[counted] = target_logits - logsumexp
        out = torch.zeros_like(logprobs)
        out[counted] = kl
        ctx.save_for_backward(
            rows, weight, bias, row_targets, ref_rows, ref_weight, ref_bias, counted, logsumexp, ref_logsumexp
        )
        ctx.chunk_size = chunk_size
        ctx.hidden_shape = hidden.shape
        return logprobs, out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight, bias, row_targets, ref_rows, ref_weight, ref_bias, counted, logsumexp, ref_logsumexp = (
            ctx.saved_tensors
        )
        dtype = logsumexp.dtype
        g_logprob, g_kl = grad_logprobs[counted].to(dtype)[:, None], grad_kl[counted].to(dtype)[:, None]

        def chunk_grad(start: int, stop: int, logits: Tensor) -> Tensor:
            # g_ℓ (onehot(y) - q) + g_K (q - p) = (g_K - g_ℓ) q - g_K p + g_ℓ onehot(y)
            probs = logits.sub_(logsumexp[start:stop, None]).exp_()
            ref_probs = _chunk_logits(ref_rows[start:stop], ref_weight, ref_bias, dtype)
            ref_probs.sub_(ref_logsumexp[start:stop, None]).exp_().mul_(g_kl[start:stop])
            probs.mul_(g_kl[start:stop] - g_logprob[start:stop]).sub_(ref_probs)
            return probs.scatter_add_(1, row_targets[start:stop, None], g_logprob[start:stop])

        grads = _output_layer_backward(ctx, rows, weight, bias, counted, dtype, chunk_grad)
        return (*grads, None, None, None, None, None)


def fused_target_logprobs_and_reference_kl(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """``ℓ_t = log π_θ(y_t|s_t)`` and ``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`` over the whole vocabulary, both from
    the last hidden states, in one pass over the policy's output layer.

    ``π_θ = softmax(h W^T + b)``, ``π_ref = softmax(h_ref W_ref^T + b_ref)``: anchored SFT (arXiv 2509.23753)
    needs ``ℓ_t`` and the reference's full next-token distribution at every counted position. As in
    ``fused_target_logprobs``, neither model's ``[N, V]`` logits are ever held: forward takes ``chunk_size``
    positions at a time, builds both chunks of logits, and keeps ``z_y``, ``K`` and the two logsumexps per
    position; backward recomputes both chunks and, with the upstream gradients ``g_ℓ`` and ``g_K``,
    ``G = g_ℓ (onehot(y) - q) + g_K (q - p)`` (``q = softmax(z)``, ``p = softmax(z_ref)``; ``∂K/∂z_v = q_v - p_v``),
    accumulates ``∂h = G W``, ``∂W += G^T h`` and ``∂b += Σ G``. The reference gets no gradient. One op for both
    halves the policy's output-layer matmuls of ``fused_target_logprobs`` followed by a separate KL pass
    (6 ``[chunk, V]`` products per chunk instead of 10).

    Memory: the saved state is the counted rows of both hidden states (``N·(H + H_ref)``), references to both
    weights and three numbers per position; the working set is one chunk of each model's fp32 logits (plus
    one transient chunk inside a logsumexp), i.e. ``O(chunk_size · V)`` whatever ``N``, plus, in backward, an
    fp32 ``[V, H]`` accumulator for ``∂W``. Positions that do not count are dropped before the matmuls.

    Args:
        hidden: ``[..., H]`` the policy's last hidden states (after the final norm), aligned with ``targets``.
        weight: ``[V, H]`` the policy's output projection.
        targets: ``[...]`` long token ids; negative ids (HF's ``-100``) do not count: both outputs are 0 there,
            with no gradient.
        ref_hidden: ``[..., H_ref]`` the reference's last hidden states at the same positions (computed without
            gradient; none flows to them).
        ref_weight: ``[V, H_ref]`` the reference's output projection.
        bias, ref_bias: optional ``[V]`` output biases.
        chunk_size: positions whose logits exist at once, in forward and in backward.

    Returns:
        ``(ℓ, K)``, each ``[...]`` in at least fp32 and differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _check_chunk_size(chunk_size)
    return _FusedTargetLogProbsAndReferenceKL.apply(
        hidden,
        weight,
        bias,
        targets,
        ref_hidden.detach(),
        ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        chunk_size,
    )


@torch.no_grad()
def token_entropy_and_kl(
    logits: Tensor, ref_logits: Tensor | None, chunk_size: int = CHUNK_SIZE
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
