"""The embedded demo world: synthetic symbol tasks with an exact gold reward.

Data side (this package): `WorldParams`, `build_world`/`write_world`, `gold_reward`.
Model side, which imports transformers: `post_train.world.model` (`train_tokenizer`,
`tiny_llama_config`).
"""

from post_train.world.demonstrator import Demonstrator, corrupt
from post_train.world.families import FAMILIES, Task, TaskFamily, parse_task
from post_train.world.generate import (
    EVAL_FILE,
    HELD_OUT,
    IN_DISTRIBUTION,
    PREFERENCES_FILE,
    PRETRAIN_FILE,
    SFT_FILE,
    WORLD_FILES,
    build_world,
    iter_world_texts,
    write_world,
)
from post_train.world.params import WorldParams, WorldParamsError, load_world_params
from post_train.world.reward import gold_reward

__all__ = [
    "EVAL_FILE",
    "FAMILIES",
    "HELD_OUT",
    "IN_DISTRIBUTION",
    "PREFERENCES_FILE",
    "PRETRAIN_FILE",
    "SFT_FILE",
    "WORLD_FILES",
    "Demonstrator",
    "Task",
    "TaskFamily",
    "WorldParams",
    "WorldParamsError",
    "build_world",
    "corrupt",
    "gold_reward",
    "iter_world_texts",
    "load_world_params",
    "parse_task",
    "write_world",
]
