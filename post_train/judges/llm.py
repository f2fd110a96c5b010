"""`llm`: an OpenAI-compatible chat-completions endpoint, asked AlpacaEval 2's pairwise question.

"Which identifier, m or M, names the better output?" The order of the two outputs is drawn per
instruction from a seeded hash and mapped back; the preference is the judge's probability
P(id of the candidate) / (P(m) + P(M)) read from its top log-probs when the endpoint returns them
(AlpacaEval's p ∈ [1, 2] minus 1), else its answer (1 or 0), else a draw. Requests are retried
with exponential backoff, time out, run `concurrency` at a time, and are cached in SQLite keyed by
(judge model, prompt version, instruction, first output, second output), so re-runs cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Mapping

from pydantic import Field, field_validator

from post_train.data import prompt_text
from post_train.errors import ConfigError
from post_train.judges.base import Judge, JudgeSettings, Verdict

logger = logging.getLogger(__name__)


class LLMJudgeSettings(JudgeSettings):
    """`evaluation.llm`: an OpenAI-compatible chat-completions endpoint, asked AlpacaEval-style pairwise questions.

    The API key is read from the environment variable *named* by `api_key_env` when the judge runs; it
    is never part of the configuration, the logs, MLflow or the cache.
    """

    base_url: str = Field(description="Endpoint root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str = Field(min_length=1, description="The judge model's name at that endpoint.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="Name of the environment variable that holds the API key; null: no key.",
    )
    logprobs: bool = Field(default=True, description="Ask for top log-probs and read the preference from them.")
    top_logprobs: int = Field(default=5, ge=2, le=20)
    max_tokens: int = Field(default=1, ge=1, description="Tokens the judge may answer with (one identifier).")
    temperature: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0, description="Per request.")
    max_retries: int = Field(
        default=5, ge=0, description="Retries of a request on a timeout, a connection error, 429 or 5xx."
    )
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each retry (capped at 60 s).")
    concurrency: int = Field(default=8, ge=1, description="Requests in flight at once.")
    seed: int = Field(default=0, description="Seeds the per-instruction order of the two outputs.")
    cache_dir: str | None = Field(
        default=None,
        description="Directory of the response cache (SQLite); default `<cache_dir>/judge`.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r}: expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "a").isalnum():
            # The value is not echoed: it might be the key itself, put here by mistake.
            raise ValueError(
                "not an environment variable name; give the variable's NAME (e.g. OPENAI_API_KEY), never the key"
            )
        return value


PROMPT_VERSION = "alpaca_eval_2_pairwise_v1"
"""Part of every cache key: a change of the judge prompt below must not reuse old answers."""

SYSTEM_PROMPT = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLM) based on "
    "the quality of their responses to a given instruction. This process will be used to create a leaderboard "
    "reflecting the most accurate and human-preferred answers."
)

USER_PROMPT = """I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": {instruction},
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "m",
        "output": {output_1}
    }},
    {{
        "model_identifier": "M",
        "output": {output_2}
    }}
}}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier
"""

FIRST, SECOND = "m", "M"
REDACTED = "[redacted]"
RETRYABLE_STATUS = {408, 409, 425, 429}
MAX_BACKOFF_S = 60.0


class JudgeError(RuntimeError):
    """The judge endpoint failed after every retry (a transient failure: the stage may be retried)."""


def judge_messages(instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
    """AlpacaEval 2's pairwise question with `output_1` as `m` and `output_2` as `M` (JSON-quoted)."""
    user = USER_PROMPT.format(
        instruction=json.dumps(instruction), output_1=json.dumps(output_1), output_2=json.dumps(output_2)
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def candidate_shown_first(seed: int, instruction: str) -> bool:
    """The per-instruction order: a seeded hash, so the same instruction gets the same order on every run."""
    return hashlib.sha256(f"{seed}\x00{instruction}".encode()).digest()[0] % 2 == 0


def first_preference(response: Mapping[str, Any]) -> tuple[float, str, str]:
    """(P(the first output, `m`, is better), how it was read, the judge's answer) from a chat completion.

    From the first generated token's top log-probs: P(m) / (P(m) + P(M)), counting tokens equal
    to `m` or `M` once whitespace is stripped. Without usable log-probs, the answer's text decides
    (m → 1, M → 0); an answer that is neither is a draw (`unparsed`).
    """
    choice = (response.get("choices") or [{}])[0]
    answer = ((choice.get("message") or {}).get("content") or "").strip()
    logprobs = choice.get("logprobs") or {}
    top: list[tuple[str, float]] = []
    content = logprobs.get("content") or []
    if content:
        top = [(entry["token"], float(entry["logprob"])) for entry in content[0].get("top_logprobs") or []]
        if not top and "token" in content[0]:
            top = [(content[0]["token"], float(content[0]["logprob"]))]
    elif logprobs.get("top_logprobs"):  # the legacy completions format: a list of {token: logprob}
        top = [(token, float(value)) for token, value in logprobs["top_logprobs"][0].items()]
    mass = {FIRST: 0.0, SECOND: 0.0}
    for token, logprob in top:
        if token.strip() in mass:
            mass[token.strip()] += math.exp(logprob)
    if mass[FIRST] + mass[SECOND] > 0:
        return mass[FIRST] / (mass[FIRST] + mass[SECOND]), "logprobs", answer
    if answer == FIRST:
        return 1.0, "answer", answer
    if answer == SECOND:
        return 0.0, "answer", answer
    return 0.5, "unparsed", answer


class ResponseCache:
    """Judge answers in SQLite: key → JSON. One connection, used under a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(str(path), check_same_thread=False, timeout=60)
        with self._lock, self._connection:
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )

    @staticmethod
    def key(judge_model: str, instruction: str, output_1: str, output_2: str) -> str:
        payload = json.dumps([judge_model, PROMPT_VERSION, instruction, output_1, output_2], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._connection.execute("SELECT value FROM judgements WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class LLMJudge(Judge):
    """AlpacaEval-style pairwise judge behind an OpenAI-compatible chat-completions endpoint."""

    name = "llm"
    settings_model = LLMJudgeSettings
    settings: LLMJudgeSettings

    def __init__(self, settings: LLMJudgeSettings, cache_dir: str | Path):
        import httpx

        super().__init__(settings, cache_dir)
        headers = {"Content-Type": "application/json"}
        self._secrets: list[str] = []
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ConfigError(
                    f"evaluation.llm.api_key_env names {settings.api_key_env}, which is not set in the environment; "
                    "export it (or set api_key_env: null for an endpoint without a key)"
                )
            headers["Authorization"] = f"Bearer {key}"
            self._secrets.append(key)
        # The key lives only in this client's headers: never in the config, logs, MLflow or the cache.
        self._client = httpx.Client(headers=headers, timeout=settings.timeout_s)
        self.url = f"{settings.base_url}/chat/completions"
        self.cache = ResponseCache(Path(settings.cache_dir or Path(cache_dir) / "judge") / "llm_judge.sqlite")
        self.requests = 0
        self.cache_hits = 0
        self._count_lock = threading.Lock()

    def describe(self):
        return {
            "judge": self.name,
            "llm.model": self.settings.model,
            "llm.base_url": self.settings.base_url,
            "llm.api_key_env": self.settings.api_key_env or "none",
            "llm.prompt": PROMPT_VERSION,
        }

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "max_tokens": self.settings.max_tokens,
            "temperature": self.settings.temperature,
        }
        if self.settings.logprobs:
            body.update(logprobs=True, top_logprobs=self.settings.top_logprobs)
        return body

    def _redacted(self, text: str) -> str:
        """`text` from the endpoint (an error body, an exception) without the key: some endpoints echo the key they
        were sent, and the text goes to logs, outputs.json, Prefect's database and MLflow."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion, retried with exponential backoff on timeouts, connection errors, 429 and 5xx."""
        import httpx

        last = ""
        for attempt in range(self.settings.max_retries + 1):
            delay = min(MAX_BACKOFF_S, self.settings.backoff_s * 2**attempt)
            with self._count_lock:
                self.requests += 1
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.settings.timeout_s} s"
            except httpx.TransportError as error:
                last = self._redacted(f"{type(error).__name__}: {error}")
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = "the response is not JSON"
                elif response.status_code in RETRYABLE_STATUS or response.status_code >= 500:
                    last = f"HTTP {response.status_code}"
                    retry_after = response.headers.get("retry-after", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        delay = min(MAX_BACKOFF_S, max(delay, float(retry_after)))
                else:  # a request the endpoint will never accept: wrong URL, model, key or parameters
                    raise ConfigError(
                        f"judge endpoint {self.url} (model {self.settings.model}) refused the request: "
                        f"HTTP {response.status_code}: {self._redacted(response.text)[:500]}"
                    )
            if attempt < self.settings.max_retries:
                logger.warning(
                    "judge request failed (%s); retry %d/%d in %.2f s",
                    last,
                    attempt + 1,
                    self.settings.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise JudgeError(f"judge endpoint {self.url} failed after {self.settings.max_retries + 1} attempts: {last}")

    def _ask(self, instruction: str, output_1: str, output_2: str) -> dict[str, Any]:
        response = self._post(self._body(judge_messages(instruction, output_1, output_2)))
        p_first, source, answer = first_preference(response)
        return {"p_first": p_first, "source": source, "answer": answer}

    def judge(self, prompts, candidates, baselines):
        verdicts: list[Verdict | None] = [None] * len(candidates)
        pending: dict[str, list[tuple[int, bool, str, str, str]]] = {}
        for index, (prompt, candidate, baseline) in enumerate(zip(prompts, candidates, baselines)):
            instruction = prompt_text(prompt)  # the user's message, or the whole conversation
            first = candidate_shown_first(self.settings.seed, instruction)
            if candidate == baseline:
                verdicts[index] = Verdict(0.5, source="identical", candidate_shown_first=first)
                continue
            output_1, output_2 = (candidate, baseline) if first else (baseline, candidate)
            key = ResponseCache.key(self.settings.model, instruction, output_1, output_2)
            pending.setdefault(key, []).append((index, first, instruction, output_1, output_2))
        answers: dict[str, dict[str, Any]] = {}
        for key in pending:
            cached = self.cache.get(key)
            if cached is not None:
                answers[key] = cached
                self.cache_hits += len(pending[key])
        todo = [key for key in pending if key not in answers]
        if todo:
            pool = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="llm-judge")
            try:
                futures = {pool.submit(self._ask, *pending[key][0][2:]): key for key in todo}
                for future in as_completed(futures):
                    key = futures[future]
                    answers[key] = future.result()
                    self.cache.put(key, answers[key])  # as they arrive: an interrupted run keeps what it paid for
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the requests not yet sent
        for key, entries in pending.items():
            answer = answers[key]
            for index, first, *_ in entries:
                p_candidate = answer["p_first"] if first else 1.0 - answer["p_first"]
                verdicts[index] = Verdict(p_candidate, source=answer["source"], candidate_shown_first=first)
        return [verdict for verdict in verdicts if verdict is not None]

    def extra_metrics(self, examples, verdicts):
        """Requests sent (retries included), answers taken from the cache, and answers that named neither output."""
        return {
            "judge_requests": float(self.requests),
            "judge_cache_hits": float(self.cache_hits),
            "judge_unparsed": float(sum(v.source == "unparsed" for v in verdicts)),
        }

    def close(self) -> None:
        self._client.close()
        self.cache.close()
