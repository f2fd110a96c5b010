"""The task families of the demo world and the parsing of their instructions.

Every task is a short list of letter symbols plus an operation. Symbols are written
separated by single spaces so that each one is a single token for the tiny model.
The instruction text alone determines the task, which is what lets the gold reward
score any prompt of the world without a side channel.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
Symbols = tuple[str, ...]


def _next_letters(symbols: Sequence[str]) -> Symbols:
    return tuple(LETTERS[LETTERS.index(symbol) + 1] for symbol in symbols)


def _repeat_each(symbols: Sequence[str]) -> Symbols:
    return tuple(symbol for symbol in symbols for _ in range(2))


@dataclass(frozen=True)
class TaskFamily:
    """One operation, with its chat instruction and its terse pretraining surface form."""

    name: str
    instruction: str
    pretrain_verb: str
    solve: Callable[[Sequence[str]], Symbols]
    # The successor of the last letter would fall outside the alphabet, so a family that
    # shifts letters draws its inputs from all letters but the last.
    excludes_last_letter: bool = False

    def input_letters(self, alphabet_size: int) -> str:
        usable = alphabet_size - 1 if self.excludes_last_letter else alphabet_size
        return LETTERS[:usable]


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        TaskFamily("copy", "Copy", "copy", tuple),
        TaskFamily("reverse", "Reverse", "reverse", lambda symbols: tuple(reversed(symbols))),
        TaskFamily("sort", "Sort", "sort", lambda symbols: tuple(sorted(symbols))),
        TaskFamily("next_letters", "Next letters", "next", _next_letters, excludes_last_letter=True),
        TaskFamily("repeat_each", "Repeat each", "repeat", _repeat_each),
    )
}
_FAMILY_BY_INSTRUCTION = {family.instruction: family for family in FAMILIES.values()}


@dataclass(frozen=True)
class Task:
    """One instance of a family: the input symbols and everything derived from them."""

    family: TaskFamily
    symbols: Symbols

    @property
    def prompt(self) -> str:
        return f"{self.family.instruction}: {' '.join(self.symbols)}"

    @property
    def target(self) -> Symbols:
        return self.family.solve(self.symbols)

    @property
    def answer(self) -> str:
        return " ".join(self.target)

    @property
    def pretrain_text(self) -> str:
        return f"{self.family.pretrain_verb} {' '.join(self.symbols)} = {self.answer}"


def parse_task(prompt: str) -> Task:
    """Recover the task from an instruction such as "Reverse: c a f b".

    Raises ValueError when the prompt is not of the world.
    """
    instruction, separator, symbols_text = prompt.strip().partition(": ")
    family = _FAMILY_BY_INSTRUCTION.get(instruction)
    if not separator or family is None:
        known = ", ".join(f'"{name}: ..."' for name in _FAMILY_BY_INSTRUCTION)
        raise ValueError(f"not a demo-world prompt: {prompt!r}; expected one of {known}")
    symbols = tuple(symbols_text.split(" "))
    allowed = family.input_letters(len(LETTERS))
    if any(len(symbol) != 1 or symbol not in allowed for symbol in symbols):
        raise ValueError(
            f"not a demo-world prompt: {prompt!r}; the symbols must be single letters "
            f"from {allowed[0]}-{allowed[-1]} separated by single spaces"
        )
    return Task(family, symbols)
