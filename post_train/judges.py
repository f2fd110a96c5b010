"""Judges: who decides whether a model's output beats another one (the reference, or a champion's).

`evaluation.judge` picks one:

- `gold` — the demo world's exact reward (`post_train.world.reward.gold_reward`); preference 1, 0.5
  or 0 by comparing the two rewards. Demo-world prompts only.
- `reward_model` — a sequence-classification model with one output (`evaluation.reward_model`): the
  chat template renders prompt + response, the model scores it, and the preference is
  σ(r_model − r_reference) (soft; its rounding is the hard verdict 1[r_model > r_reference], ties 0.5).
- `llm` — an OpenAI-compatible chat-completions endpoint (`evaluation.llm`), asked AlpacaEval 2's
  pairwise question ("which identifier, m or M, names the better output?"). The order of the two
  outputs is drawn per instruction from a seeded hash and mapped back; the preference is the judge's
  probability P(id of the model) / (P(m) + P(M)) read from its top log-probs when the endpoint returns
  them (AlpacaEval's p ∈ [1, 2] minus 1), else its answer (1 or 0), else a draw. Requests are retried
  with exponential backoff, time out, run `concurrency` at a time, and are cached in SQLite keyed by
  (judge model, prompt version, instruction, first output, second output), so re-runs cost nothing.

Every judge calls byte-identical outputs a draw without asking.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from post_train.config import ConfigError, EvaluationConfig, LLMJudgeConfig, RewardModelJudgeConfig
from post_train.evaluation import preference, soft_preference

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Verdict:
    preference: float
    """P(the model's output is better than the reference's), in [0, 1]; 0.5 is a draw."""
    model_score: float | None = None
    reference_score: float | None = None
    source: str = ""
    """How it was decided: identical, gold, reward_model, logprobs, answer, unparsed."""
    model_shown_first: bool | None = None
    """llm: whether the model's output was shown to the judge as `m` (first)."""


class Judge:
    name = "judge"

    def judge(self, prompts: Sequence[Messages], outputs: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """One verdict per instruction: `outputs[i]` (the model) against `references[i]`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What identifies the judge, for MLflow params and model cards (never a secret)."""
        return {"judge": self.name}

    def close(self) -> None:
        pass


def instruction_text(prompt: Messages) -> str:
    """The instruction a judge sees: the user's message, or the whole conversation for several turns."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{message['role']}: {message['content']}" for message in prompt)


class GoldJudge(Judge):
    """The demo world's exact reward."""

    name = "gold"

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

    def judge(self, prompts, outputs, references):
        model, reference = self.scores(prompts, outputs), self.scores(prompts, references)
        return [
            Verdict(0.5 if o == r else preference(m, s), m, s, "identical" if o == r else "gold")
            for o, r, m, s in zip(outputs, references, model, reference)
        ]


class RewardModelJudge(Judge):
    """A Bradley–Terry reward model: AutoModelForSequenceClassification with one label."""

    name = "reward_model"

    def __init__(self, settings: RewardModelJudgeConfig, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = settings
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(settings.name_or_path, dtype=torch.float32)
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
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    def describe(self):
        return {"judge": self.name, "reward_model": self.settings.name_or_path}

    def scores(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """r(x, y) for each prompt and response: the model's one logit on the rendered conversation."""
        import torch

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
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(chunk):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention_mask[row, : len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
                scores.extend(float(value) for value in logits[:, 0].float().cpu())
        return scores

    def judge(self, prompts, outputs, references):
        model = self.scores(prompts, outputs)
        reference = self.scores(prompts, references)
        return [
            Verdict(0.5 if o == r else soft_preference(m, s), m, s, "identical" if o == r else "reward_model")
            for o, r, m, s in zip(outputs, references, model, reference)
        ]


# --------------------------------------------------------------------------------------------- llm judge

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
RETRYABLE_STATUS = {408, 409, 425, 429}
MAX_BACKOFF_S = 60.0


class JudgeError(RuntimeError):
    """The judge endpoint failed after every retry (a transient failure: the stage may be retried)."""


def judge_messages(instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
    """AlpacaEval 2's pairwise question with `output_1` as `m` and `output_2` as `M` (JSON-quoted)."""
    user = USER_PROMPT.format(instruction=json.dumps(instruction), output_1=json.dumps(output_1), output_2=json.dumps(output_2))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def model_shown_first(seed: int, instruction: str) -> bool:
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
            self._connection.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

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
            self._connection.execute("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class LLMJudge(Judge):
    """AlpacaEval-style pairwise judge behind an OpenAI-compatible chat-completions endpoint."""

    name = "llm"

    def __init__(self, settings: LLMJudgeConfig, cache_dir: str | Path, environ: Mapping[str, str] | None = None):
        import httpx

        environ = os.environ if environ is None else environ
        self.settings = settings
        headers = {"Content-Type": "application/json"}
        if settings.api_key_env is not None:
            key = environ.get(settings.api_key_env)
            if not key:
                raise ConfigError(
                    f"evaluation.llm.api_key_env names {settings.api_key_env}, which is not set in the environment; "
                    "export it (or set api_key_env: null for an endpoint without a key)"
                )
            headers["Authorization"] = f"Bearer {key}"
        # The key lives only in this client's headers: never in the config, logs, MLflow or the cache.
        self._client = httpx.Client(headers=headers, timeout=settings.timeout_s)
        self.url = f"{settings.base_url}/chat/completions"
        self.cache = ResponseCache(Path(settings.cache_dir or Path(cache_dir) / "judge") / "llm_judge.sqlite")
        self.requests = 0
        self.cache_hits = 0
        self._count_lock = threading.Lock()

    def describe(self):
        return {"judge": self.name, "llm.model": self.settings.model, "llm.base_url": self.settings.base_url,
                "llm.api_key_env": self.settings.api_key_env or "none", "llm.prompt": PROMPT_VERSION}

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model, "messages": messages,
            "max_tokens": self.settings.max_tokens, "temperature": self.settings.temperature,
        }
        if self.settings.logprobs:
            body.update(logprobs=True, top_logprobs=self.settings.top_logprobs)
        return body

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
                last = f"{type(error).__name__}: {error}"
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
                        f"HTTP {response.status_code}: {response.text[:500]}"
                    )
            if attempt < self.settings.max_retries:
                logger.warning("judge request failed (%s); retry %d/%d in %.2f s", last, attempt + 1, self.settings.max_retries, delay)
                time.sleep(delay)
        raise JudgeError(f"judge endpoint {self.url} failed after {self.settings.max_retries + 1} attempts: {last}")

    def _ask(self, instruction: str, output_1: str, output_2: str) -> dict[str, Any]:
        response = self._post(self._body(judge_messages(instruction, output_1, output_2)))
        p_first, source, answer = first_preference(response)
        return {"p_first": p_first, "source": source, "answer": answer}

    def judge(self, prompts, outputs, references):
        verdicts: list[Verdict | None] = [None] * len(outputs)
        pending: dict[str, list[tuple[int, bool, str, str, str]]] = {}
        for index, (prompt, output, reference) in enumerate(zip(prompts, outputs, references)):
            instruction = instruction_text(prompt)
            first = model_shown_first(self.settings.seed, instruction)
            if output == reference:
                verdicts[index] = Verdict(0.5, source="identical", model_shown_first=first)
                continue
            output_1, output_2 = (output, reference) if first else (reference, output)
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
                p_model = answer["p_first"] if first else 1.0 - answer["p_first"]
                verdicts[index] = Verdict(p_model, source=answer["source"], model_shown_first=first)
        return [verdict for verdict in verdicts if verdict is not None]

    def close(self) -> None:
        self._client.close()
        self.cache.close()


def make_judge(evaluation: EvaluationConfig, cache_dir: str | Path) -> Judge:
    """The judge `evaluation.judge` names, with its settings."""
    if evaluation.judge == "gold":
        return GoldJudge()
    if evaluation.judge == "reward_model":
        return RewardModelJudge(evaluation.reward_model)
    return LLMJudge(evaluation.llm, cache_dir)
