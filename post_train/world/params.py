"""`WorldParams`: the validated knobs of the demo world, read from `params.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from post_train.world.families import FAMILIES, LETTERS

Count = Annotated[int, Field(ge=1)]
LengthRange = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


class WorldParamsError(ValueError):
    """A params file whose world section is missing or invalid."""


class WorldParams(BaseModel):
    """Everything the generated files depend on; the same params give byte-identical files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    families: list[str] = Field(min_length=2, description="Every family of the world; pretraining covers them all.")
    held_out_families: list[str] = Field(
        min_length=1,
        description="Families that SFT and DPO never see: the held_out evaluation split, at the same input lengths.",
    )
    lengths: LengthRange = Field(description="[min, max] input symbols of every task.")
    alphabet_size: int = Field(ge=2, le=len(LETTERS), description="Symbols are the first alphabet_size letters.")
    n_pretrain_docs: Count
    chat_pretrain_fraction: float = Field(
        ge=0,
        lt=1,
        description="Share of pretraining documents that are demonstrator conversations in the chat format "
        "(every family), so the base model knows the format before SFT.",
    )
    chat_pretrain_error_rate: float = Field(
        ge=0,
        le=1,
        description="How often the pretraining conversations' answers hold a mistake: a noisier source than the "
        "SFT demonstrator, so SFT still has something to teach.",
    )
    n_sft: Count
    n_preference_pairs: Count
    n_eval_per_split: Count
    demonstrator_error_rate: float = Field(ge=0, le=1)

    @field_validator("families", "held_out_families")
    @classmethod
    def _known_and_unique(cls, families: list[str]) -> list[str]:
        unknown = [name for name in families if name not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; valid families are {sorted(FAMILIES)}")
        if len(set(families)) != len(families):
            raise ValueError(f"families must not repeat: {families}")
        return families

    @field_validator("lengths")
    @classmethod
    def _ordered(cls, lengths: tuple[int, int]) -> tuple[int, int]:
        if lengths[0] > lengths[1]:
            raise ValueError(f"[min, max] must have min <= max, got {list(lengths)}")
        return lengths

    @model_validator(mode="after")
    def _held_out_is_a_strict_subset(self) -> WorldParams:
        outside = [name for name in self.held_out_families if name not in self.families]
        if outside:
            raise ValueError(f"held_out_families {outside} are not among families {self.families}")
        if not self.trained_families:
            raise ValueError("held_out_families hold every family: SFT and DPO would have no task to train on")
        return self

    @model_validator(mode="after")
    def _eval_fits_each_split(self) -> WorldParams:
        # Eval prompts are distinct and excluded from training, so each split needs a task
        # space well beyond its eval set for rejection sampling to stay cheap.
        for split, families in (("in_distribution", self.trained_families), ("held_out", self.held_out_families)):
            available = self.n_distinct_tasks(families)
            if self.n_eval_per_split * 2 > available:
                raise ValueError(
                    f"n_eval_per_split={self.n_eval_per_split} is too large for the {split} split, which has only "
                    f"{available} distinct tasks; at most half may go to eval"
                )
        return self

    @property
    def trained_families(self) -> list[str]:
        """The families of the SFT demonstrations, the preference pairs and the in_distribution split."""
        return [name for name in self.families if name not in self.held_out_families]

    def n_distinct_tasks(self, families: list[str]) -> int:
        """How many different prompts `families` allow for the world's input lengths."""
        return sum(
            len(FAMILIES[name].input_letters(self.alphabet_size)) ** length
            for name in families
            for length in range(self.lengths[0], self.lengths[1] + 1)
        )


def load_world_params(params_path: Path, scale: str) -> WorldParams:
    """Read and validate `world.<scale>` of a params YAML file.

    Raises WorldParamsError naming the file and the offending field.
    """
    try:
        document = yaml.safe_load(params_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise WorldParamsError(f"{params_path}: cannot read params: {error}") from error
    scales = document.get("world") if isinstance(document, dict) else None
    if not isinstance(scales, dict) or not isinstance(scales.get(scale), dict):
        available = sorted(scales) if isinstance(scales, dict) else []
        raise WorldParamsError(f"{params_path}: no mapping at world.{scale} (scales found: {available})")
    try:
        return WorldParams.model_validate(scales[scale])
    except ValidationError as error:
        problems = "; ".join(f"{_field_path(scale, issue['loc'])}: {issue['msg']}" for issue in error.errors())
        raise WorldParamsError(f"{params_path}: {problems}") from error


def _field_path(scale: str, loc: tuple[int | str, ...]) -> str:
    return f"world.{scale}" + "".join(f".{part}" if isinstance(part, str) else f"[{part}]" for part in loc)
