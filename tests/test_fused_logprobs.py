import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from losses.logprobs import fused_target_logprobs, token_logprobs

F64 = torch.float64
IGNORE = -100


def random_problem(seed: int, shape=(2, 5), hidden_size=7, vocab=11, dtype=F64, ignored=2):
    """hidden ``[*shape, H]``, weight ``[V, H]``, bias ``[V]``, targets ``shape`` with ``ignored`` -100s."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*shape, hidden_size), generator=gen, dtype=F64).to(dtype)
    weight = torch.randn((vocab, hidden_size), generator=gen, dtype=F64).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=F64).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[:ignored] = IGNORE
    return hidden, weight, bias, targets


def plain_logprobs(hidden, weight, bias, targets):
    """The definition: full logits, log-softmax, gather; ignored targets give 0."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return logprobs.masked_fill(targets < 0, 0.0)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 1024])
def test_values_and_gradients_match_the_plain_path_in_float64(chunk_size, with_bias):
    hidden, weight, bias, targets = random_problem(0)
    bias = bias if with_bias else None
    upstream = torch.randn(targets.shape, dtype=F64, generator=torch.Generator().manual_seed(1))

    ours_inputs = leaves(hidden, weight, bias)
    ours = fused_target_logprobs(ours_inputs[0], ours_inputs[1], targets, bias=ours_inputs[2], chunk_size=chunk_size)
    (ours * upstream).sum().backward()

    plain_inputs = leaves(hidden, weight, bias)
    plain = plain_logprobs(plain_inputs[0], plain_inputs[1], plain_inputs[2], targets)
    (plain * upstream).sum().backward()

    assert ours.shape == targets.shape and ours.dtype == F64
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for ours_grad, plain_grad in zip(grads(*ours_inputs), grads(*plain_inputs)):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-12, atol=1e-12)


def test_ignored_targets_give_zero_and_no_gradient():
    hidden, weight, bias, targets = random_problem(2, ignored=3)
    hidden, weight, bias = leaves(hidden, weight, bias)
    ours = fused_target_logprobs(hidden, weight, targets, bias=bias, chunk_size=4)
    ours.sum().backward()
    ignored = targets < 0
    assert (ours[ignored] == 0).all() and (hidden.grad[ignored] == 0).all()
    assert (ours[~ignored] < 0).all() and (hidden.grad[~ignored] != 0).any()


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_still_do():
    hidden, weight, bias, targets = random_problem(10)
    plain_hidden, ours_hidden = leaves(hidden, hidden)
    plain_logprobs(plain_hidden, weight, bias, targets).sum().backward()
    fused_target_logprobs(ours_hidden, weight, targets, bias=bias, chunk_size=3).sum().backward()
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(ours_hidden.grad, plain_hidden.grad, rtol=1e-12, atol=1e-12)


def test_all_targets_ignored_gives_zeros_and_zero_gradients():
    hidden, weight, bias, targets = random_problem(3, ignored=10)
    hidden, weight, bias = leaves(hidden, weight, bias)
    ours = fused_target_logprobs(hidden, weight, targets, bias=bias)
    ours.sum().backward()
    assert (ours == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()


def test_bf16_inputs_match_an_fp32_reference_and_keep_their_dtypes():
    hidden, weight, bias, targets = random_problem(4, shape=(3, 16), hidden_size=32, vocab=300, dtype=torch.bfloat16)
    ours_inputs = leaves(hidden, weight, bias)
    ours = fused_target_logprobs(ours_inputs[0], ours_inputs[1], targets, bias=ours_inputs[2], chunk_size=5)
    ours.sum().backward()

    reference_inputs = leaves(hidden.float(), weight.float(), bias.float())
    reference = plain_logprobs(*reference_inputs, targets)
    reference.sum().backward()

    def assert_close_at_bf16_precision(actual, expected):
        # bf16 keeps 8 significant bits: allow a few units in the last place of the largest entry.
        scale = expected.detach().abs().max().item()
        torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2 * scale)

    assert ours.dtype == torch.float32
    assert_close_at_bf16_precision(ours, reference)
    for ours_grad, reference_grad in zip(grads(*ours_inputs), grads(*reference_inputs)):
        assert ours_grad.dtype == torch.bfloat16
        assert_close_at_bf16_precision(ours_grad, reference_grad)


def test_gradcheck():
    hidden, weight, bias, targets = random_problem(5, shape=(5,), hidden_size=3, vocab=4, ignored=1)
    hidden, weight, bias = leaves(hidden, weight, bias)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_target_logprobs(h, w, targets, bias=b, chunk_size=2), (hidden, weight, bias)
    )


def test_weight_tied_with_the_input_embedding_accumulates_both_gradients():
    gen = torch.Generator().manual_seed(6)
    token_ids = torch.randint(0, 11, (2, 6), generator=gen)
    projection = torch.randn(7, 7, generator=gen, dtype=F64)

    def tied_logprobs(log_probs_of):
        embedding = torch.nn.Embedding(11, 7, dtype=F64)
        torch.nn.init.normal_(embedding.weight, generator=torch.Generator().manual_seed(7))
        hidden = torch.tanh(embedding(token_ids[:, :-1]) @ projection)
        log_probs_of(hidden, embedding.weight, token_ids[:, 1:]).sum().backward()
        return embedding.weight.grad

    ours = tied_logprobs(lambda h, w, t: fused_target_logprobs(h, w, t, chunk_size=4))
    plain = tied_logprobs(lambda h, w, t: plain_logprobs(h, w, None, t))
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


def test_chunk_size_must_be_positive():
    hidden, weight, _, targets = random_problem(8)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_target_logprobs(hidden, weight, targets, chunk_size=0)


# ---------------------------------------------------------------- memory: nothing of size N x V

POSITIONS, HIDDEN, VOCAB, CHUNK = 512, 8, 1024, 32


def memory_problem():
    hidden, weight, bias, targets = random_problem(
        9, shape=(POSITIONS,), hidden_size=HIDDEN, vocab=VOCAB, dtype=torch.float32, ignored=0
    )
    return *leaves(hidden, weight, bias), targets


def fused(hidden, weight, bias, targets):
    return fused_target_logprobs(hidden, weight, targets, bias=bias, chunk_size=CHUNK)


def unfused(hidden, weight, bias, targets):
    return token_logprobs(hidden @ weight.T + bias, targets, chunk_size=CHUNK)


def saved_numels(log_probs_of) -> list[int]:
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs_of(*memory_problem())
    return saved


def largest_op_allocation(log_probs_of) -> int:
    """Bytes of the largest allocation any op (forward or backward) holds when it returns."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        log_probs_of(*memory_problem()).sum().backward()
    return max(event.cpu_memory_usage for event in prof.events())


def test_backward_saves_no_position_by_vocabulary_tensor():
    assert max(saved_numels(unfused)) >= POSITIONS * VOCAB  # the probe sees the logits when they are saved
    assert max(saved_numels(fused)) <= VOCAB * HIDDEN


def test_no_op_allocates_more_than_a_chunk_of_logits_or_the_weight_gradient():
    logits_bytes = POSITIONS * VOCAB * 4
    assert largest_op_allocation(unfused) >= logits_bytes  # the probe sees [N, V] allocations
    chunk_bytes = CHUNK * VOCAB * 4
    weight_grad_bytes = VOCAB * HIDDEN * 4
    assert largest_op_allocation(fused) <= chunk_bytes + weight_grad_bytes + POSITIONS * HIDDEN * 4 < logits_bytes
