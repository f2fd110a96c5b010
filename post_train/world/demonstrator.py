"""An imperfect demonstrator: right most of the time, with the slips a person makes."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from post_train.world.families import Symbols, Task


def _swap_adjacent(symbols: Symbols, alphabet: str, rng: random.Random) -> Symbols:
    if len(symbols) < 2:
        return symbols
    index = rng.randrange(len(symbols) - 1)
    return symbols[:index] + (symbols[index + 1], symbols[index]) + symbols[index + 2 :]


def _drop_one(symbols: Symbols, alphabet: str, rng: random.Random) -> Symbols:
    # A demonstrator always answers something, and an empty answer could not be corrupted further.
    if len(symbols) < 2:
        return symbols
    index = rng.randrange(len(symbols))
    return symbols[:index] + symbols[index + 1 :]


def _duplicate_one(symbols: Symbols, alphabet: str, rng: random.Random) -> Symbols:
    index = rng.randrange(len(symbols))
    return symbols[: index + 1] + symbols[index:]


def _replace_one(symbols: Symbols, alphabet: str, rng: random.Random) -> Symbols:
    index = rng.randrange(len(symbols))
    replacement = rng.choice([letter for letter in alphabet if letter != symbols[index]])
    return symbols[:index] + (replacement,) + symbols[index + 1 :]


MISTAKES: tuple[Callable[[Symbols, str, random.Random], Symbols], ...] = (
    _swap_adjacent,
    _drop_one,
    _duplicate_one,
    _replace_one,
)


def corrupt(symbols: Symbols, alphabet: str, rng: random.Random) -> Symbols:
    """Make one mistake, drawn again until it changes the answer.

    Swapping two equal symbols changes nothing; redrawing keeps every corruption a real
    error, so the configured error rate is the rate of wrong answers.
    """
    while True:
        corrupted = rng.choice(MISTAKES)(symbols, alphabet, rng)
        if corrupted != symbols:
            return corrupted


@dataclass
class Demonstrator:
    """Answers correctly, except that with probability `error_rate` it makes one mistake."""

    error_rate: float
    alphabet: str
    rng: random.Random

    def respond(self, task: Task) -> Symbols:
        if self.rng.random() < self.error_rate:
            return self.corrupt(task.target)
        return task.target

    def corrupt(self, symbols: Symbols) -> Symbols:
        return corrupt(symbols, self.alphabet, self.rng)
