"""What stages hand each other: plain records of paths, hashes and metrics, the same in every process.

A stage's command writes its result as JSON and the next stage reads it back as one of these, so
stages share these types instead of importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ALL = "all"
"""The split that pools every evaluation prompt."""
HEAD_TO_HEAD = "head_to_head/"
"""Prefix of the head-to-head metrics: `head_to_head/win_rate/<split>`, `head_to_head/win_rate_ci_low/<split>`, ..."""
CHANCE_ACCURACY = 0.5
"""Reward accuracy of a coin flip: a DPO model whose chosen responses win less often than this got worse."""


def splits_in(keys: Iterable[str]) -> list[str]:
    """Splits named by `win_rate/<split>` keys (a metrics dict, a table row): the others sorted, then `all`.

    Every table, plot and model card orders its splits with this, so `all` is the last column everywhere.
    """
    found = {key.split("/", 1)[1] for key in keys if key.startswith("win_rate/")}
    return sorted(found - {ALL}) + ([ALL] if ALL in found else [])


@dataclass(frozen=True)
class PreparedData:
    sft: str
    preferences: str
    eval: str
    data_hash: str
    """DVC's md5 of the world's output directory when all data comes from the world, else a sha256 of the sources."""
    pretrain_corpus: str | None
    sizes: dict[str, int]
    hashes: dict[str, str]
    """A content hash per dataset (`sft`, `preferences`, `eval`) and, with a demo world, `world` (DVC's md5 of the
    files pretraining reads): each stage's cache key takes those of the data it reads, and no other."""


@dataclass(frozen=True)
class TrainedModel:
    """A model directory and the metrics of the stage that made it (none for a user's model taken as given)."""

    path: str
    metrics: dict[str, float]
    run_id: str = ""
    cache_hit: bool = False

    @property
    def regressions(self) -> list[str]:
        """How the stage ended worse than it started: its final loss above its first, or its final DPO reward
        accuracy below chance. Empty when neither (and for a model taken as given)."""
        found = []
        first, final = self.metrics.get("loss_first"), self.metrics.get("loss_final")
        if first is not None and final is not None and final > first:
            found.append(f"final loss {final:.4f} is above the first {first:.4f}")
        accuracy = self.metrics.get("rewards/accuracies_final")
        if accuracy is not None and accuracy < CHANCE_ACCURACY:
            found.append(f"final reward accuracy {accuracy:.2f} is below chance ({CHANCE_ACCURACY:.2f})")
        return found


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    """`win_rate/<split>`, `win_rate_se/<split>`, `lc_win_rate/<split>`, ... (split `all` overall), and diagnostics."""
    run_id: str
    cache_hit: bool = False
    samples_path: str = ""
    """The per-prompt table (`eval_samples.json`: split, outputs, preference, gold reward, ...), in the stage's
    cached output directory."""

    @property
    def win_rate(self) -> float:
        return self.metrics[f"win_rate/{ALL}"]


@dataclass(frozen=True)
class Champion:
    """The registered champion as a challenger meets it: downloaded for a head-to-head, unless the two are not
    comparable or the challenger is registered already (no head-to-head is needed then)."""

    version: str
    path: str
    """Its checkpoint directory; "" when it was not downloaded."""
    incomparable: tuple[str, ...] = ()
    """What makes it incomparable with the challenger (`post_train.registry.incomparabilities`); empty: comparable."""
    challenger_registered_as: str | None = None
    """The version that already holds the challenger's weights, if any: registering returns that version."""

    @property
    def needs_head_to_head(self) -> bool:
        return not self.incomparable and self.challenger_registered_as is None


@dataclass(frozen=True)
class HeadToHead:
    metrics: dict[str, float]
    run_id: str
    cache_hit: bool = False
    samples_path: str = ""
    """The per-prompt table (`eval_samples.json`: split, outputs, preference, gold reward, ...), in the stage's
    cached output directory."""

    @property
    def win_rate(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate/{ALL}"]

    @property
    def ci_low(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate_ci_low/{ALL}"]

    @property
    def ci_high(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate_ci_high/{ALL}"]

    @property
    def win_rate_discrete(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate_discrete/{ALL}"]


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str
    is_champion: bool
    previous_champion: str | None
    reason: str = ""
    """Why the version was or was not promoted."""
    head_to_head: dict[str, float] | None = None
    """The head-to-head metrics against `previous_champion`; None when none was run."""
    already_registered: bool = False
    """The weights were registered before, as `version`: no new version was made."""
    aliases: tuple[str, ...] = ()
    """The version's aliases once registered."""
