import math

import pytest

from post_train.evaluation import GenerationSettings, generate_responses, preference, win_rate


def test_preference_is_one_half_zero():
    assert preference(0.9, 0.5) == 1.0
    assert preference(0.5, 0.5) == 0.5
    assert preference(0.2, 0.5) == 0.0


def test_win_rate_and_standard_error_follow_alpacaeval():
    preferences = [1.0, 0.0, 0.5, 1.0]
    rate, error = win_rate(preferences)
    assert rate == pytest.approx(0.625)
    sample_std = math.sqrt(sum((p - 0.625) ** 2 for p in preferences) / 3)
    assert error == pytest.approx(sample_std / 2)
    assert win_rate([0.5] * 10) == (0.5, 0.0)  # a model that always ties its reference
    swapped = [1 - p for p in preferences]
    assert win_rate(swapped)[0] == pytest.approx(1 - rate)
    with pytest.raises(ValueError):
        win_rate([])


def test_generation_is_batched_reproducible_and_stops_at_eos(smoke_stages):
    from post_train.modeling import load_model, load_tokenizer

    _, _, base = smoke_stages
    tokenizer, model = load_tokenizer(base.path), load_model(base.path, trainable=False)
    prompts = [[{"role": "user", "content": f"Copy: {'a b c d'[: 2 * n + 1]}"}] for n in range(5)]
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=2, seed=3)
    first = generate_responses(model, tokenizer, prompts, sampled)
    assert first == generate_responses(model, tokenizer, prompts, sampled)
    assert len(first) == 5 and all("<|" not in text for text in first)
    greedy = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=5, seed=0)
    one_by_one = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=1, seed=0)
    # Left padding must not change what a prompt generates.
    assert generate_responses(model, tokenizer, prompts, greedy) == generate_responses(model, tokenizer, prompts, one_by_one)
