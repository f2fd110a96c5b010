"""Win-rate statistics and the theory's diagnostics, for the evaluate and register stages.

Win rates follow AlpacaEval 2 (shared docs/evaluation.md), as fractions in [0, 1]:

- a judge gives a *soft preference* per instruction, `p ∈ [0, 1]` = P(model's output is better than
  the reference's); AlpacaEval's `p ∈ [1, 2]` minus 1. Byte-identical outputs are a draw, 0.5.
- raw win rate = mean p; standard error = sample std (ddof=1) / √n;
- discrete win rate = mean of p rounded to {0, 0.5, 1} (a draw stays 0.5);
- bootstrap CI: percentiles of the mean over `samples` resamples of the instructions (seeded);
- length-controlled (LC) win rate: AlpacaEval's GLM without the per-instruction difficulty term,
  see `length_controlled_win_rate`.
"""

from __future__ import annotations

import math
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from post_train.data import EvalExample, Prompt, completion_example, response_completion
from post_train.generators.base import GenerationSettings
from post_train.generators.in_process import generate_token_ids
from post_train.results import ALL

if TYPE_CHECKING:
    from post_train.world.families import Task

# --------------------------------------------------------------------------------------------- statistics


def preference(model_score: float, reference_score: float) -> float:
    """1 when the model's response scores higher, 0.5 on a tie, 0 when the reference's does."""
    if model_score > reference_score:
        return 1.0
    return 0.5 if model_score == reference_score else 0.0


def soft_preference(model_score: float, reference_score: float) -> float:
    """σ(r_model − r_reference): a Bradley–Terry reward model's probability that the model's response is better."""
    difference = model_score - reference_score
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    return math.exp(difference) / (1.0 + math.exp(difference))  # the same, without overflow for large negatives


def discrete(p: float) -> float:
    """A soft preference as a verdict: 1 (model), 0.5 (draw), 0 (reference)."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def win_rate(preferences: Sequence[float]) -> tuple[float, float]:
    """(win rate, standard error), both fractions: the mean and sample std (ddof=1) / √n."""
    n = len(preferences)
    if n == 0:
        raise ValueError("no preferences to compute a win rate from")
    mean = sum(preferences) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((p - mean) ** 2 for p in preferences) / (n - 1)
    return mean, math.sqrt(variance / n)


def bootstrap_ci(
    preferences: Sequence[float],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean preference: `samples` resamples of the instructions, seeded."""
    values = np.asarray(preferences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no preferences to bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // values.size)  # bound the index matrix's memory
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        means[start : start + count] = values[rng.integers(0, values.size, size=(count, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _logistic_loss(weights: np.ndarray, features: np.ndarray, labels: np.ndarray, penalty: float) -> float:
    logits = features @ weights
    # -[p log σ(z) + (1-p) log σ(-z)] = log(1 + e^z) - p z, computed stably
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits) + 0.5 * penalty * weights[1] ** 2)


def length_controlled_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    reference_lengths: Sequence[float],
    length_penalty: float = 1e-4,
) -> float:
    """AlpacaEval 2's length-controlled win rate without the per-instruction difficulty term.

    A logistic GLM of the soft preference `p_i` on two features, no intercept:
    `z_i = θ · 1 + φ · tanh(Δlen_i / std(Δlen))`, with Δlen = reference length − model length in
    characters (scaled by the sample std, not centred) and the constant 1 the identity of the model
    under test. Fitted by maximum likelihood (Newton's method with a line search) with a small L2
    penalty on φ only, which keeps φ finite when the length feature separates the verdicts and
    leaves θ unpenalised. LC = σ(θ): the prediction with the length term set to zero (AlpacaEval
    averages σ(θ + ψγ_i) over instructions; without difficulty γ that is σ(θ)).
    Equal lengths make the feature 0 and LC equal to the raw win rate; swapping model and
    reference maps LC to 1 − LC. A win rate of exactly 0 or 1 is returned as is.
    """
    labels = np.asarray(preferences, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no preferences to compute a win rate from")
    mean = float(labels.mean())
    if mean <= 0.0 or mean >= 1.0:
        return mean
    delta = np.asarray(reference_lengths, dtype=np.float64) - np.asarray(model_lengths, dtype=np.float64)
    scale = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    length = np.tanh(delta / scale) if scale > 0 else np.zeros_like(delta)
    features = np.column_stack([np.ones_like(length), length])
    weights = np.array([math.log(mean / (1 - mean)), 0.0])
    ridge = np.diag([0.0, length_penalty])
    loss = _logistic_loss(weights, features, labels, length_penalty)
    for _ in range(100):
        probabilities = 1.0 / (1.0 + np.exp(-(features @ weights)))
        gradient = features.T @ (probabilities - labels) / labels.size + ridge @ weights
        curvature = probabilities * (1 - probabilities)
        hessian = (features * curvature[:, None]).T @ features / labels.size + ridge
        try:
            step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        except np.linalg.LinAlgError:
            step = gradient
        size = 1.0
        while size > 1e-10:
            candidate = weights - size * step
            candidate_loss = _logistic_loss(candidate, features, labels, length_penalty)
            if candidate_loss <= loss + 1e-15:
                break
            size /= 2
        else:
            break
        weights, loss = candidate, candidate_loss
        if np.max(np.abs(size * step)) < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-weights[0])))


def summarize(
    preferences: Sequence[float],
    model_lengths: Sequence[float],
    reference_lengths: Sequence[float],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Every win-rate statistic of one set of preferences: raw, discrete and LC win rates, standard error,
    bootstrap CI, average lengths (characters) and the number of prompts."""
    rate, error = win_rate(preferences)
    low, high = bootstrap_ci(preferences, samples, confidence, seed)
    return {
        "win_rate": rate,
        "win_rate_discrete": win_rate([discrete(p) for p in preferences])[0],
        "win_rate_se": error,
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "lc_win_rate": length_controlled_win_rate(preferences, model_lengths, reference_lengths),
        "avg_length": float(np.mean(model_lengths)),
        "reference_avg_length": float(np.mean(reference_lengths)),
        "num_prompts": float(len(preferences)),
    }


def split_groups(splits: Sequence[str]) -> dict[str, list[int]]:
    """Indices of the items of each split, and of every item under `all`, in order of first appearance."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, split in enumerate(splits):
        groups[split].append(index)
        if split != ALL:
            groups[ALL].append(index)
    return groups


def split_means(splits: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """The mean of `values` over the items of each split and over all of them (`all`)."""
    return {split: sum(values[i] for i in indices) / len(indices) for split, indices in split_groups(splits).items()}


def split_metrics(
    splits: Sequence[str],
    preferences: Sequence[float],
    model_outputs: Sequence[str],
    reference_outputs: Sequence[str],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """`<statistic>/<split>` for every split and for `all`, lengths in characters."""
    metrics: dict[str, float] = {}
    for split, indices in split_groups(splits).items():
        summary = summarize(
            [preferences[i] for i in indices],
            [len(model_outputs[i]) for i in indices],
            [len(reference_outputs[i]) for i in indices],
            samples,
            confidence,
            seed,
        )
        metrics.update({f"{key}/{split}": value for key, value in summary.items()})
    return metrics


# --------------------------------------------------------------------------------------------- diagnostics


def spread(examples: Sequence[EvalExample], count: int) -> list[EvalExample]:
    """At most `count` examples, evenly spaced, so every split is represented (eval files list split by split)."""
    if len(examples) <= count:
        return list(examples)
    step = len(examples) / count
    return [examples[int(i * step)] for i in range(count)]


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties share their mean rank); NaN if one side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2:
        return float("nan")
    ranks = []
    for values in (a, b):
        order = np.argsort(values, kind="mergesort")
        rank = np.empty(values.size)
        sorted_values = values[order]
        start = 0
        while start < values.size:
            end = start
            while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
                end += 1
            rank[order[start : end + 1]] = (start + end) / 2.0
            start = end + 1
        ranks.append(rank)
    ra, rb = ranks[0] - ranks[0].mean(), ranks[1] - ranks[1].mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denominator) if denominator > 0 else float("nan")


def prefix_value(instruction: str, prefix: str) -> float:
    """The demo world's value of a response prefix: the gold reward of the best completion consistent with it.

    With k symbols written (m of them right) and a target of T symbols, the best continuation
    writes the T − k missing correct symbols and stops, so the value is (m + T − k) / T for
    k ≤ T and m / k past the target. The empty prefix is worth 1 for every prompt, which is what
    lets prefixes of different prompts be ranked together (V*(s_0) is the same constant).
    """
    from post_train.world.families import parse_task

    target = parse_task(instruction).target
    written = prefix.split()
    matches = sum(expected == given for expected, given in zip(target, written))
    if len(written) <= len(target):
        return (matches + len(target) - len(written)) / len(target)
    return matches / len(written)


def is_world_prompt(instruction: str) -> bool:
    from post_train.world.families import parse_task

    try:
        parse_task(instruction)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    instruction: str
    chosen: str
    rejected: str
    split: str


def held_out_pairs(examples: Sequence[EvalExample], seed: int = 0) -> list[PreferencePair]:
    """Preference pairs on the evaluation prompts (disjoint from every training prompt).

    For each demo-world prompt: its reference response and a copy of it with one demonstrator
    mistake (swap, drop, duplicate or replace a letter; `post_train.world.demonstrator.corrupt`,
    seeded), ordered by gold reward; pairs whose rewards tie are dropped.
    """
    import random

    from post_train.world.demonstrator import corrupt
    from post_train.world.reward import gold_reward

    rng = random.Random(seed)
    pairs = []
    for example in examples:
        instruction = example.instruction
        symbols = tuple(example.reference.split())
        if not symbols or not is_world_prompt(instruction):
            continue
        used = [c for c in instruction.split(": ", 1)[-1].split() + list(symbols) if c in string.ascii_lowercase]
        letters = max(2, max(string.ascii_lowercase.index(c) for c in used) + 1) if used else 2
        alphabet = string.ascii_lowercase[:letters]
        corrupted = " ".join(corrupt(symbols, alphabet, rng))
        first, second = gold_reward(instruction, example.reference), gold_reward(instruction, corrupted)
        if first == second:
            continue
        chosen, rejected = (example.reference, corrupted) if first > second else (corrupted, example.reference)
        pairs.append(PreferencePair(example.prompt, instruction, chosen, rejected, example.split))
    return pairs


def completion_batch(
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int,
) -> dict[str, Any]:
    """Prompt + response token batches, right-padded, `loss_mask` on the response tokens (as SFT counts them)."""
    from post_train.modeling import pad_collate

    rows = []
    for prompt, response in zip(prompts, responses):
        rows.append(completion_example(tokenizer, prompt, response_completion(prompt, response), max_length))
    return pad_collate(tokenizer.pad_token_id)(rows)


def completion_batches(
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int,
    batch_size: int,
    device,
) -> Iterator[dict[str, Any]]:
    """`completion_batch`es of `batch_size` prompts and responses, in order, on `device`."""
    from post_train.modeling import to_device

    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        yield to_device(completion_batch(tokenizer, prompts[chunk], responses[chunk], max_length), device)


@torch.no_grad()
def response_logprobs(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int = 256,
    batch_size: int = 32,
) -> list[tuple[list[int], list[float]]]:
    """For each response: its token ids and `log π(y_t | x, y_<t)` under `model`."""
    from post_train.modeling import target_logprobs

    device = next(model.parameters()).device
    results: list[tuple[list[int], list[float]]] = []
    for batch in completion_batches(tokenizer, prompts, responses, max_length, batch_size, device):
        logps, mask = target_logprobs(model, batch)
        targets = batch["input_ids"][:, 1:]
        for row in range(logps.shape[0]):
            keep = mask[row]
            results.append((targets[row][keep].tolist(), logps[row][keep].float().tolist()))
    return results


def implicit_reward_diagnostics(
    model,
    reference,
    tokenizer,
    pairs: Sequence[PreferencePair],
    max_length: int = 256,
    batch_size: int = 32,
) -> dict[str, float]:
    """Implicit reward r̂(x, y) = Σ_t (ℓ_t − ℓ_t^ref) (β = 1) of `model` against `reference` on `pairs`.

    `accuracy/<split>`: fraction of pairs with r̂(chosen) > r̂(rejected) (strictly, as TRL's
    `rewards/accuracies`); `margin/<split>`: mean r̂(chosen) − r̂(rejected) in nats.
    `q_spearman`: Spearman ρ, over every prefix y_≤k of every chosen and rejected response, between
    the cumulative log-ratio Σ_{t≤k}(ℓ_t − ℓ_t^ref) and the prefix's gold value (`prefix_value`).
    """
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    policy = response_logprobs(model, tokenizer, prompts, responses, max_length, batch_size)
    base = response_logprobs(reference, tokenizer, prompts, responses, max_length, batch_size)
    ratios = [np.asarray(lp) - np.asarray(ref_lp) for (_, lp), (_, ref_lp) in zip(policy, base)]
    rewards = [float(r.sum()) for r in ratios]
    n = len(pairs)
    metrics: dict[str, float] = {}
    for split, indices in split_groups([pair.split for pair in pairs]).items():
        margins = [rewards[i] - rewards[n + i] for i in indices]
        metrics[f"accuracy/{split}"] = float(np.mean([m > 0 for m in margins]))
        metrics[f"margin/{split}"] = float(np.mean(margins))
    cumulative, values = [], []
    instructions = [p.instruction for p in pairs] * 2
    for (ids, _), ratio, instruction in zip(policy, ratios, instructions):
        running = np.cumsum(ratio)
        for k in range(1, len(ids) + 1):
            cumulative.append(float(running[k - 1]))
            values.append(prefix_value(instruction, tokenizer.decode(ids[:k], skip_special_tokens=True)))
    metrics["q_spearman"] = rank_correlation(cumulative, values)
    metrics["num_pairs"] = float(n)
    return metrics


@torch.no_grad()
def token_weighted_entropy_and_kl(model, reference, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """`entropy_and_kl_of_batch` pooled over `batches`, each batch weighted by its counted tokens
    (Σ_b n_b · m_b / Σ_b n_b, n_b = the batch's `loss_mask` targets): the per-token mean over all of them."""
    from post_train.modeling import entropy_and_kl_of_batch

    totals: dict[str, float] = defaultdict(float)
    tokens = 0
    for batch in batches:
        count = int(batch["loss_mask"][:, 1:].sum())
        for key, value in entropy_and_kl_of_batch(model, reference, batch).items():
            totals[key] += value * count
        tokens += count
    return {key: value / max(tokens, 1) for key, value in totals.items()}


@torch.no_grad()
def entropy_and_kl_of_responses(
    model,
    reference,
    tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int = 256,
    batch_size: int = 32,
) -> dict[str, float]:
    """`token_weighted_entropy_and_kl` over prompt + response batches (`completion_batch`), on the response tokens:
    `entropy` of `model` and `kl`, exact KL(model ‖ reference), when a reference is given."""
    device = next(model.parameters()).device
    batches = completion_batches(tokenizer, prompts, responses, max_length, batch_size, device)
    return token_weighted_entropy_and_kl(model, reference, batches)


# --------------------------------------------------------------------------------------------- native format
# The demo base model is pretrained mostly on terse documents, BOS "<verb> <symbols> = <answer>" EOS
# (tasks/pretrain.py `corpus_ids`): that is where it is competent, so drift from it is measured there.


def native_prompt(task: Task) -> str:
    """The terse prompt of a task, its pretraining document up to and with "=": "reverse c a f b ="."""
    prompt, separator, answer = task.pretrain_text.rpartition(" = ")
    if not separator or answer != task.answer:
        raise ValueError(f"{task.pretrain_text!r} is not of the form '<verb> <symbols> = <answer>'")
    return f"{prompt} ="


def _bos_and_tokens(tokenizer, text: str) -> list[int]:
    """BOS (none for a tokenizer without one) + the tokens of `text`, as pretraining starts a document."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def native_prompt_ids(tokenizer, task: Task) -> list[int]:
    """BOS + the tokens of `native_prompt`: what the base model continues with the answer."""
    return _bos_and_tokens(tokenizer, native_prompt(task))


def native_batch(tokenizer, tasks: Sequence[Task]) -> dict[str, Any]:
    """Terse documents, BOS + tokens of `task.pretrain_text` + EOS, right-padded (`pad_collate`), `loss_mask` on the
    answer tokens only (those after "=", EOS excluded): what the KL and entropy are measured on."""
    from post_train.modeling import pad_collate

    rows = []
    for task in tasks:
        prompt = native_prompt_ids(tokenizer, task)
        document = _bos_and_tokens(tokenizer, task.pretrain_text)
        if document[: len(prompt)] != prompt:  # Metaspace splits at every space, so this holds for world tokenizers
            raise ValueError(
                f"the tokens of {native_prompt(task)!r} are not a prefix of those of {task.pretrain_text!r}"
            )
        answer = len(document) - len(prompt)
        rows.append(
            {
                "input_ids": document + [tokenizer.eos_token_id],
                "loss_mask": [False] * len(prompt) + [True] * answer + [False],
            }
        )
    return pad_collate(tokenizer.pad_token_id)(rows)


@torch.no_grad()
def native_kl(
    model, base, tokenizer, instructions: Sequence[str], splits: Sequence[str], batch_size: int
) -> dict[str, float]:
    """Exact token KL(model ‖ base) on the answer tokens of the instructions' terse documents (`native_batch`), per
    split and `all`: Σ_t Σ_v π(v | x_<t) log(π(v | x_<t) / π_base(v | x_<t)) / |A| over the split's answer
    positions A (`token_weighted_entropy_and_kl`)."""
    from post_train.modeling import to_device
    from post_train.world.families import parse_task

    tasks = [parse_task(instruction) for instruction in instructions]
    device = next(model.parameters()).device
    found = {}
    for split, indices in split_groups(splits).items():
        chosen = [tasks[i] for i in indices]
        batches = (
            to_device(native_batch(tokenizer, chosen[start : start + batch_size]), device)
            for start in range(0, len(chosen), batch_size)
        )
        found[split] = token_weighted_entropy_and_kl(model, base, batches)["kl"]
    return found


def native_continuation(tokenizer, token_ids: Sequence[int]) -> str:
    """The text of generated tokens up to the first EOS, stripped; other special tokens stay in the text, so an
    answer with a stray role token is not an exact match."""
    ids = list(token_ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


def native_accuracy(
    model,
    tokenizer,
    instructions: Sequence[str],
    splits: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, float]:
    """Exact-match accuracy in the terse format, per split and `all`: the fraction of tasks whose greedy continuation
    of BOS + "<verb> <symbols> =" (`native_continuation`, left-padded batches of `generate_token_ids`) is
    `task.answer`."""
    from post_train.world.families import parse_task

    tasks = [parse_task(instruction) for instruction in instructions]
    greedy = GenerationSettings(max_new_tokens, temperature=0.0, top_p=1.0, batch_size=batch_size, seed=0)
    generated = generate_token_ids(model, tokenizer, [native_prompt_ids(tokenizer, task) for task in tasks], greedy)
    correct = [float(native_continuation(tokenizer, ids) == task.answer) for ids, task in zip(generated, tasks)]
    return split_means(splits, correct)
