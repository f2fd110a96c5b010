"""What a registered version is comparable on, and which version already holds a model's weights.

A challenger may replace the champion only when a head-to-head between them means something: both were
evaluated on the same evaluation set, by the same judge with the same settings (and, for a reward model, the same
weights), and both turn text into tokens and messages into text the same way. Each version records these as tags
(`COMPARABLE_ON`), with its base model beside them (recorded, not required: a new base with the same tokenizer,
evaluation set and judge is an improvement to measure, not a different task), and the sha256 of its weights
(`WEIGHTS_TAG`), by which the registry finds a model that is already registered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from post_train.config import EvaluationSettings, PipelineConfig
from post_train.fingerprint import files_sha256, model_fingerprint
from post_train.judges import judge_fingerprint
from post_train.modeling import load_tokenizer

EVAL_TAG = "eval_hash"
JUDGE_TAG = "judge"
JUDGE_FINGERPRINT_TAG = "judge_fingerprint"
TOKENIZER_TAG = "tokenizer_sha256"
BASE_MODEL_TAG = "base_model"
BASE_MODEL_FINGERPRINT_TAG = "base_model_fingerprint"
WEIGHTS_TAG = "weights_sha256"

COMPARABLE_ON = {
    EVAL_TAG: "evaluation set",
    JUDGE_TAG: "judge",
    JUDGE_FINGERPRINT_TAG: "judge settings",
    TOKENIZER_TAG: "tokenizer and chat template",
}
"""The tags two versions must share for a head-to-head between them to decide a promotion, and what each names."""


def weights_sha256(model_path: str) -> str:
    """sha256 of the checkpoint's `*.safetensors` files (names and content, sorted by name): the weights alone, so
    that a model card, a config comment or the directory's place does not make the same model a new one."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_path} holds no *.safetensors file: the registry identifies a model by its weights")
    return files_sha256(files)


def tokenizer_sha256(model_path: str) -> str:
    """sha256 of how the checkpoint's tokenizer turns text into tokens and messages into text: its class, its
    `tokenizers` definition (vocabulary, merges, normalisation, pre- and post-processing, added tokens; the
    vocabulary alone for a tokenizer without one), its special tokens and its chat template.

    Taken from the loaded tokenizer, not from its files: `save_pretrained` writes how a tokenizer was loaded into
    `tokenizer_config.json` (`is_local`, `local_files_only`), so the same tokenizer saved twice differs byte for byte.
    """
    tokenizer = load_tokenizer(model_path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "class": type(tokenizer).__name__,
        "definition": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special_tokens": tokenizer.special_tokens_map,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def judge_sha256(evaluation: EvaluationSettings) -> str:
    """sha256 of the judge's fingerprint (`post_train.judges.judge_fingerprint`: its settings, a reward model's
    weights), the same part of the evaluate and head-to-head cache keys."""
    return hashlib.sha256(json.dumps(judge_fingerprint(evaluation), sort_keys=True).encode()).hexdigest()


def evaluation_identity(config: PipelineConfig, eval_hash: str) -> dict[str, str]:
    """The comparability tags known before any training: the evaluation set's content hash and the judge."""
    return {
        EVAL_TAG: eval_hash,
        JUDGE_TAG: config.evaluation.judge,
        JUDGE_FINGERPRINT_TAG: judge_sha256(config.evaluation),
    }


def comparability_tags(
    config: PipelineConfig, eval_hash: str, model_path: str, base_model_path: str | None = None
) -> dict[str, str]:
    """Every comparability tag of the model at `model_path` (`COMPARABLE_ON`), and its base model: the path or Hub
    name it was trained from and that model's fingerprint (`post_train.fingerprint.model_fingerprint`), "none" when
    not given."""
    return {
        **evaluation_identity(config, eval_hash),
        TOKENIZER_TAG: tokenizer_sha256(model_path),
        BASE_MODEL_TAG: base_model_path or "none",
        BASE_MODEL_FINGERPRINT_TAG: model_fingerprint(base_model_path) if base_model_path else "none",
    }


def _short(value: str) -> str:
    return value if len(value) <= 16 else f"{value[:12]}…"


def incomparabilities(challenger: Mapping[str, str], champion: Mapping[str, str]) -> list[str]:
    """What makes the champion's tags incomparable with the challenger's, one phrase each; empty when comparable.

    Only the `COMPARABLE_ON` keys the challenger gives are compared (`retrain` knows the evaluation set and the judge
    before training, not yet the tokenizer). A champion without one of them (registered before versions recorded
    it) is incomparable on it.
    """
    found = []
    for key, what in COMPARABLE_ON.items():
        if key not in challenger:
            continue
        theirs = champion.get(key)
        if theirs is None:
            found.append(f"the champion records no {what} (tag `{key}`)")
        elif theirs != challenger[key]:
            found.append(f"different {what} (`{key}` {_short(challenger[key])} vs the champion's {_short(theirs)})")
    return found


def version_with_weights(client: MlflowClient, name: str, weights: str) -> ModelVersion | None:
    """The first version of `name` tagged with these weights (`WEIGHTS_TAG`), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{weights}'")
    return min(found, key=lambda version: int(version.version)) if found else None
