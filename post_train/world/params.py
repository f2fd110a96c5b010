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
    families: list[str] = Field(min_length=1)
    in_distribution_lengths: LengthRange = Field(description="[min, max] input symbols of training and eval tasks.")
    held_out_lengths: LengthRange = Field(description="[min, max] input symbols of out-of-distribution eval tasks.")
    alphabet_size: int = Field(ge=2, le=len(LETTERS), description="Symbols are the first alphabet_size letters.")
    n_pretrain_docs: Count
    n_sft: Count
    n_preference_pairs: Count
    n_eval_per_split: Count
    demonstrator_error_rate: float = Field(ge=0, le=1)

    @field_validator("families")
    @classmethod
    def _known_and_unique(cls, families: list[str]) -> list[str]:
        unknown = [name for name in families if name not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; valid families are {sorted(FAMILIES)}")
        if len(set(families)) != len(families):
            raise ValueError(f"families must not repeat: {families}")
        return families

    @field_validator("in_distribution_lengths", "held_out_lengths")
    @classmethod
    def _ordered(cls, lengths: tuple[int, int]) -> tuple[int, int]:
        if lengths[0] > lengths[1]:
            raise ValueError(f"[min, max] must have min <= max, got {list(lengths)}")
        return lengths

    @model_validator(mode="after")
    def _splits_do_not_overlap(self) -> WorldParams:
        (in_min, in_max), (out_min, out_max) = self.in_distribution_lengths, self.held_out_lengths
        if in_min <= out_max and out_min <= in_max:
            raise ValueError(
                f"held_out_lengths {[out_min, out_max]} overlap in_distribution_lengths {[in_min, in_max]}"
            )
        return self

    @model_validator(mode="after")
    def _eval_fits_each_split(self) -> WorldParams:
        # Eval prompts are distinct and excluded from training, so each split needs a task
        # space well beyond its eval set for rejection sampling to stay cheap.
        for split, lengths in (("in_distribution", self.in_distribution_lengths), ("held_out", self.held_out_lengths)):
            available = self.n_distinct_tasks(lengths)
            if self.n_eval_per_split * 2 > available:
                raise ValueError(
                    f"n_eval_per_split={self.n_eval_per_split} is too large for the {split} split, which has only "
                    f"{available} distinct tasks; at most half may go to eval"
                )
        return self

    def n_distinct_tasks(self, lengths: tuple[int, int]) -> int:
        """How many different prompts the configured families allow for input lengths [min, max]."""
        return sum(
            len(FAMILIES[name].input_letters(self.alphabet_size)) ** length
            for name in self.families
            for length in range(lengths[0], lengths[1] + 1)
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
