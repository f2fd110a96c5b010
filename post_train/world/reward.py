"""The exact, programmatic gold reward of the demo world."""

from __future__ import annotations

from post_train.world.families import parse_task


def gold_reward(prompt: str, response: str) -> float:
    """Score `response` to the world instruction `prompt` in [0, 1] with partial credit.

    The response is read as whitespace-separated symbols; the score is the number of
    positions where it agrees with the correct answer divided by the longer of the two
    lengths, so both missing and surplus symbols cost credit. An empty response scores 0.
    Raises ValueError when the prompt is not of the world.
    """
    target = parse_task(prompt).target
    answer = response.split()
    if not answer:
        return 0.0
    matches = sum(expected == given for expected, given in zip(target, answer))
    return matches / max(len(target), len(answer))
