"""What a run shows its orchestrator: links into the MLflow UI, a stage's metrics in one line, win-rate table rows.

Plain values only (no Prefect here): `flows/` turns them into Prefect log lines and artifacts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from post_train.results import HEAD_TO_HEAD, splits_in

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `make mlflow-ui` (`mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000`) serves a local store."""


def mlflow_ui_url(tracking_uri: str) -> str:
    """The MLflow UI of a store: a tracking server (http/https) is its own UI, without any credentials in the URI;
    a local store (SQLite, files) is browsed with `make mlflow-ui` at `LOCAL_MLFLOW_UI`."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return LOCAL_MLFLOW_UI
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (its route `#/experiments/<id>/runs/<run id>`)."""
    return f"{mlflow_ui_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, name: str, version: str) -> str:
    """The registered model version's page in the MLflow UI (its route `#/models/<name>/versions/<version>`)."""
    return f"{mlflow_ui_url(tracking_uri)}/#/models/{quote(name, safe='')}/versions/{version}"


def metrics_line(metrics: Mapping[str, float]) -> str:
    """`key=value` for every metric, sorted by key, four significant digits."""
    return ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))


def _percent(value: float | None) -> float | None:
    """A rate in percent with one decimal; None for a missing or undefined value (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(100 * value, 1)


def win_rate_rows(metrics: Mapping[str, float], against: str = "reference", prefix: str = "") -> list[dict[str, Any]]:
    """One row per split (`all` last) of the `<prefix>win_rate.../<split>` metrics of an evaluation, rates in %.

    `prefix` is `results.HEAD_TO_HEAD` for the head-to-head stage's metrics; `against` names the other side.
    """
    own = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    rows = []
    for split in splits_in(own):

        def get(statistic: str, split: str = split) -> float | None:
            return own.get(f"{statistic}/{split}")

        rows.append(
            {
                "against": against,
                "split": split,
                "win rate %": _percent(get("win_rate")),
                "s.e. %": _percent(get("win_rate_se")),
                "95% CI low %": _percent(get("win_rate_ci_low")),
                "95% CI high %": _percent(get("win_rate_ci_high")),
                "discrete %": _percent(get("win_rate_discrete")),
                "length-controlled %": _percent(get("lc_win_rate")),
                "prompts": int(get("num_prompts") or 0),
            }
        )
    return rows


def head_to_head_rows(metrics: Mapping[str, float], champion_version: str) -> list[dict[str, Any]]:
    """`win_rate_rows` of a head-to-head's metrics (`head_to_head/...`) against champion `champion_version`."""
    return win_rate_rows(metrics, f"champion v{champion_version}", HEAD_TO_HEAD)
