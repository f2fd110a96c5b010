"""`gold`: the demo world's exact reward (`post_train.world.reward.gold_reward`); demo-world prompts only.

The preference is 1, 0.5 or 0 by comparing the candidate's and the baseline's rewards.
"""

from __future__ import annotations

from typing import Sequence

from post_train.errors import ConfigError
from post_train.judges.base import Judge, JudgeSettings, Messages, Verdict


class GoldJudgeSettings(JudgeSettings):
    """`evaluation.gold`: none; the demo world's reward has no knobs."""


class GoldJudge(Judge):
    name = "gold"
    settings_model = GoldJudgeSettings

    @classmethod
    def check(cls, settings, examples):
        from post_train.evaluation import is_world_prompt

        others = [e.instruction for e in examples if not is_world_prompt(e.instruction)]
        if others:
            raise ConfigError(
                f"evaluation.judge gold scores demo-world prompts only, and {len(others)} of the {len(examples)} "
                f"evaluation prompts are others (the first: {others[0][:80]!r}); "
                "use evaluation.judge: reward_model or llm"
            )

    def scores(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        from post_train.world.reward import gold_reward

        scores = []
        for prompt, response in zip(prompts, responses):
            instruction = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
            try:
                scores.append(gold_reward(instruction, response))
            except ValueError as error:
                raise ConfigError(
                    f"evaluation.judge gold scores demo-world prompts only ({error}); "
                    "use evaluation.judge: reward_model or llm for other data"
                ) from None
        return scores

    def judge(self, prompts, candidates, baselines):
        from post_train.evaluation import preference

        candidate_scores, baseline_scores = self.scores(prompts, candidates), self.scores(prompts, baselines)
        return [
            Verdict(0.5 if c == b else preference(cs, bs), cs, bs, "identical" if c == b else "gold")
            for c, b, cs, bs in zip(candidates, baselines, candidate_scores, baseline_scores)
        ]
