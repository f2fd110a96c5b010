"""`reward_model`: a Bradley–Terry reward model, AutoModelForSequenceClassification with one label.

The chat template renders prompt + response, the model scores it, and the preference is
σ(r_candidate − r_baseline) (soft; its rounding is the hard verdict 1[r_candidate > r_baseline], ties 0.5).
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from post_train.errors import ConfigError
from post_train.judges.base import Judge, JudgeSettings, Messages, Verdict


class RewardModelJudgeSettings(JudgeSettings):
    """`evaluation.reward_model`: a local or Hub sequence-classification model with one output (a reward)."""

    name_or_path: str = Field(
        min_length=1, description="AutoModelForSequenceClassification (num_labels=1): a directory or Hub name."
    )
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(
        default=1024, ge=8, description="Tokens of prompt + response; longer ones lose their start."
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template for a reward model whose tokenizer has none.",
    )


class RewardModelJudge(Judge):
    name = "reward_model"
    settings_model = RewardModelJudgeSettings
    settings: RewardModelJudgeSettings

    def __init__(self, settings: RewardModelJudgeSettings, cache_dir):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from post_train.modeling import load_frozen

        super().__init__(settings, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.name_or_path)
            # float32 on a GPU too: bfloat16's 8-bit mantissa would turn close rewards into ties.
            self.model = load_frozen(
                settings.name_or_path, dtype=torch.float32, model_class=AutoModelForSequenceClassification
            )
        except OSError as error:
            raise ConfigError(f"evaluation.reward_model.name_or_path {settings.name_or_path!r}: {error}") from None
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"evaluation.reward_model {settings.name_or_path!r} has {self.model.config.num_labels} labels; "
                "a reward model has one (num_labels=1)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = settings.chat_template
        if self.tokenizer.chat_template is None:
            raise ConfigError(
                f"evaluation.reward_model {settings.name_or_path!r}: the tokenizer has no chat template; "
                "set evaluation.reward_model.chat_template"
            )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def fingerprint(cls, settings: RewardModelJudgeSettings):
        """The settings and the weights: a reward model retrained in place at the same path scores differently."""
        from post_train.fingerprint import model_fingerprint

        return {**super().fingerprint(settings), "weights": model_fingerprint(settings.name_or_path)}

    def describe(self):
        return {"judge": self.name, "reward_model": self.settings.name_or_path}

    def scores(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """r(x, y) for each prompt and response: the model's one logit on the rendered conversation."""
        import torch

        from post_train.modeling import pad_token_rows

        sequences = []
        for prompt, response in zip(prompts, responses):
            ids = self.tokenizer.apply_chat_template(
                list(prompt) + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True
            )["input_ids"]
            sequences.append(list(ids)[-self.settings.max_length :])  # keep the response, lose the prompt's start
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(sequences), self.settings.batch_size):
                chunk = sequences[start : start + self.settings.batch_size]
                input_ids, attention_mask = pad_token_rows(chunk, self.tokenizer.pad_token_id)
                device = self.model.device
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                scores.extend(float(value) for value in logits[:, 0].float().cpu())
        return scores

    def judge(self, prompts, candidates, baselines):
        from post_train.evaluation import soft_preference

        candidate_scores, baseline_scores = self.scores(prompts, candidates), self.scores(prompts, baselines)
        return [
            Verdict(0.5 if c == b else soft_preference(cs, bs), cs, bs, "identical" if c == b else "reward_model")
            for c, b, cs, bs in zip(candidates, baselines, candidate_scores, baseline_scores)
        ]

    def extra_metrics(self, examples, verdicts):
        """`reward/<split>` and `reference_reward/<split>`: mean scores of the candidate's and baseline's outputs."""
        from post_train.evaluation import split_means

        splits = [example.split for example in examples]
        candidate = split_means(splits, [verdict.candidate_score for verdict in verdicts])
        baseline = split_means(splits, [verdict.baseline_score for verdict in verdicts])
        return {
            **{f"reward/{split}": mean for split, mean in candidate.items()},
            **{f"reference_reward/{split}": mean for split, mean in baseline.items()},
        }
