"""The judges: gold, a tiny real reward model, and the llm judge against a real local HTTP server
speaking the OpenAI chat-completions API (with log-probs)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from post_train.config import ConfigError, EvaluationConfig, EvaluationSettings, load_config
from post_train.fingerprint import model_fingerprint
from post_train.judges import JUDGES, judge_class, judge_fingerprint, make_judge
from post_train.judges.base import Judge, JudgeSettings
from post_train.judges.gold import GoldJudge, GoldJudgeSettings
from post_train.judges.llm import JudgeError, LLMJudge, LLMJudgeSettings, candidate_shown_first, first_preference
from post_train.judges.reward_model import RewardModelJudge, RewardModelJudgeSettings

SECRET = "sk-test-0123456789abcdef-never-store-me"
KEY_ENV = "POST_TRAIN_TEST_JUDGE_KEY"
OUTPUT = re.compile(r'"output": (".*")$', re.MULTILINE)


class JudgeServer:
    """An OpenAI-compatible `/v1/chat/completions` on 127.0.0.1 that prefers the longer of the two outputs.

    With log-probs requested it answers P(longer) = `confidence` in `top_logprobs` (whitespace
    variants and an unrelated token included); `logprobs=False` makes it ignore the request's
    log-probs (an endpoint without them). `fail_next` answers that many requests with HTTP 500;
    `delay` holds every answer that long; `status` answers every request with that error, whose body quotes the
    request's Authorization header when `echo_key` (as some endpoints do in a 401). Every request is recorded.
    """

    def __init__(self, confidence: float = 0.8, logprobs: bool = True):
        self.confidence, self.logprobs = confidence, logprobs
        self.fail_next, self.delay, self.status, self.echo_key = 0, 0.0, None, False
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fail = server.fail_next > 0
                    server.fail_next -= fail
                try:
                    time.sleep(server.delay)
                    if server.status is not None:
                        message = "no such model"
                        if server.echo_key:
                            message = f"Incorrect API key provided: {self.headers.get('Authorization')}"
                        return self._send(server.status, {"error": {"message": message}})
                    if fail:
                        return self._send(500, {"error": {"message": "overloaded"}})
                    return self._send(200, server.completion(body))
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def shown(body: dict) -> tuple[str, str]:
        """The outputs shown as m and M."""
        first, second = OUTPUT.findall(body["messages"][-1]["content"])
        return json.loads(first), json.loads(second)

    def completion(self, body: dict) -> dict:
        first, second = self.shown(body)
        better, worse = ("m", "M") if len(first) >= len(second) else ("M", "m")
        choice = {"index": 0, "message": {"role": "assistant", "content": better}, "finish_reason": "stop"}
        if body.get("logprobs") and self.logprobs:
            p = self.confidence
            top = [
                {"token": better, "logprob": math.log(p * 0.9)},
                {"token": f" {better}", "logprob": math.log(p * 0.1)},
                {"token": worse, "logprob": math.log(1 - p)},
                {"token": "The", "logprob": -9.0},
            ]
            choice["logprobs"] = {
                "content": [
                    {"token": better, "logprob": math.log(p * 0.9), "top_logprobs": top[: body["top_logprobs"]]}
                ]
            }
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"], "choices": [choice]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def llm_settings(server: JudgeServer, tmp_path: Path, **overrides) -> LLMJudgeSettings:
    values = {
        "base_url": server.base_url,
        "model": "judge-test",
        "api_key_env": KEY_ENV,
        "backoff_s": 0.01,
        "cache_dir": str(tmp_path / "judge-cache"),
        "concurrency": 4,
        **overrides,
    }
    return LLMJudgeSettings(**values)


def pairs(n: int = 12) -> tuple[list, list[str], list[str]]:
    """Instructions whose model output is longer than the reference on even rows and shorter on odd ones."""
    prompts = [[{"role": "user", "content": f"Write about topic {i}."}] for i in range(n)]
    outputs = [("a long and detailed answer " * 3 if i % 2 == 0 else "short") + f" #{i}" for i in range(n)]
    references = [f"a medium answer #{i}" for i in range(n)]
    return prompts, outputs, references


# --------------------------------------------------------------------------------------------- llm


def test_llm_judge_randomises_the_order_reads_logprobs_and_maps_back(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    prompts, outputs, references = pairs()
    prompts.append([{"role": "user", "content": "Say hi."}])
    outputs.append("hi")
    references.append("hi")  # byte-identical: a draw without asking
    judge = LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)
    verdicts = judge.judge(prompts, outputs, references)
    judge.close()

    assert len(judge_server.requests) == 12 and judge.requests == 12
    assert verdicts[-1].preference == 0.5 and verdicts[-1].source == "identical"
    shown_first = [v.candidate_shown_first for v in verdicts[:-1]]
    assert set(shown_first) == {True, False}, "the order must vary across instructions"
    for i, verdict in enumerate(verdicts[:-1]):
        # The server prefers the longer output with probability 0.8, wherever it was shown.
        assert verdict.preference == pytest.approx(0.8 if i % 2 == 0 else 0.2)
        assert verdict.source == "logprobs"
        assert verdict.candidate_shown_first == candidate_shown_first(0, prompts[i][0]["content"])
    by_instruction = {
        json.loads(re.search(r'"instruction": (".*"),', r["body"]["messages"][-1]["content"]).group(1)): r
        for r in judge_server.requests
    }
    for i in range(12):
        first, second = JudgeServer.shown(by_instruction[prompts[i][0]["content"]]["body"])
        assert (first, second) == ((outputs[i], references[i]) if shown_first[i] else (references[i], outputs[i]))
    request = judge_server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == f"Bearer {SECRET}"
    assert (
        request["body"]["logprobs"] is True
        and request["body"]["top_logprobs"] == 5
        and request["body"]["max_tokens"] == 1
    )
    # Another seed, another order for some instructions; the same preferences.
    other = LLMJudge(llm_settings(judge_server, tmp_path, seed=1), tmp_path)
    again = other.judge(prompts[:-1], outputs[:-1], references[:-1])
    other.close()
    assert [v.candidate_shown_first for v in again] != shown_first
    assert [v.preference for v in again] == pytest.approx([v.preference for v in verdicts[:-1]])


def test_llm_judge_uses_the_answer_when_the_endpoint_gives_no_logprobs(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = JudgeServer(logprobs=False)
    try:
        prompts, outputs, references = pairs(6)
        judge = LLMJudge(llm_settings(server, tmp_path), tmp_path)
        verdicts = judge.judge(prompts, outputs, references)
        judge.close()
    finally:
        server.close()
    assert [v.preference for v in verdicts] == [1.0, 0.0] * 3
    assert {v.source for v in verdicts} == {"answer"}


def test_first_preference_reads_alpacaeval_logprobs_and_answers():
    def completion(content, top=None):
        choice = {"message": {"content": content}}
        if top is not None:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": content,
                        "logprob": 0.0,
                        "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top],
                    }
                ]
            }
        return {"choices": [choice]}

    assert first_preference(completion("m", [("m", 0.6), ("M", 0.2), ("x", 0.2)]))[:2] == (
        pytest.approx(0.75),
        "logprobs",
    )
    assert first_preference(completion("M", [(" M", 0.5), ("M", 0.3), ("\nm", 0.2)]))[0] == pytest.approx(0.2)
    assert first_preference(completion("m"))[:2] == (1.0, "answer")
    assert first_preference(completion("M", [("Sure", 0.9)]))[:2] == (0.0, "answer")
    assert first_preference(completion("I cannot decide"))[:2] == (0.5, "unparsed")


def test_llm_judge_retries_server_errors_with_backoff(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    prompts, outputs, references = pairs(4)
    judge_server.fail_next = 3
    judge = LLMJudge(llm_settings(judge_server, tmp_path, concurrency=1), tmp_path)
    verdicts = judge.judge(prompts, outputs, references)
    assert len(judge_server.requests) == 4 + 3
    assert [v.preference for v in verdicts] == pytest.approx([0.8, 0.2, 0.8, 0.2])
    judge.close()

    judge_server.fail_next = 10
    failing = LLMJudge(llm_settings(judge_server, tmp_path / "other", max_retries=2, concurrency=1), tmp_path)
    before = len(judge_server.requests)
    with pytest.raises(JudgeError, match="after 3 attempts: HTTP 500"):
        failing.judge(prompts[:1], ["x" * 50], ["y"])
    failing.close()
    assert len(judge_server.requests) - before == 3


def test_llm_judge_times_out_and_refuses_bad_requests_without_retrying(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge_server.delay = 0.5
    slow = LLMJudge(llm_settings(judge_server, tmp_path, timeout_s=0.1, max_retries=1), tmp_path)
    with pytest.raises(JudgeError, match="timed out"):
        slow.judge(*[x[:1] for x in pairs(1)])
    slow.close()
    assert len(judge_server.requests) == 2

    judge_server.delay, judge_server.status = 0.0, 404
    refused = LLMJudge(llm_settings(judge_server, tmp_path / "refused"), tmp_path)
    with pytest.raises(ConfigError, match="HTTP 404"):
        refused.judge(*[x[:1] for x in pairs(1)])
    refused.close()
    assert len(judge_server.requests) == 3  # no retry of a request the endpoint will never accept


def test_an_endpoint_that_echoes_the_key_never_gets_it_into_an_error(judge_server, tmp_path, monkeypatch, caplog):
    """The refusal's message goes to the console, outputs.json, Prefect's database and MLflow's `error` tag."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge_server.status, judge_server.echo_key = 401, True
    judge = LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)
    with pytest.raises(ConfigError, match=r"HTTP 401: .*Incorrect API key provided: Bearer \[redacted\]") as refused:
        judge.judge(*[x[:1] for x in pairs(1)])
    judge.close()
    assert judge_server.requests[-1]["authorization"] == f"Bearer {SECRET}"  # the endpoint did get (and echo) it
    assert SECRET not in str(refused.value) and SECRET not in caplog.text


def test_llm_judge_limits_concurrency(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge_server.delay = 0.05
    judge = LLMJudge(llm_settings(judge_server, tmp_path, concurrency=3), tmp_path)
    judge.judge(*pairs(12))
    judge.close()
    assert 1 < judge_server.max_in_flight <= 3


def test_llm_judge_cache_makes_a_rerun_free(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    prompts, outputs, references = pairs(8)
    first = LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)
    verdicts = first.judge(prompts, outputs, references)
    first.close()
    assert len(judge_server.requests) == 8

    second = LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)  # a new process would do the same
    cached = second.judge(prompts, outputs, references)
    second.close()
    assert len(judge_server.requests) == 8 and second.requests == 0 and second.cache_hits == 8
    assert cached == verdicts

    # The key is (judge model, instruction, both outputs): a new output or judge model asks again.
    third = LLMJudge(llm_settings(judge_server, tmp_path, model="another-judge"), tmp_path)
    third.judge(prompts[:2], outputs[:1] + ["a brand new output"], references[:2])
    third.close()
    assert len(judge_server.requests) == 10
    fourth = LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)
    fourth.judge(prompts[:2], outputs[:1] + ["a brand new output"], references[:2])
    fourth.close()
    assert len(judge_server.requests) == 11
    assert SECRET.encode() not in (tmp_path / "judge-cache" / "llm_judge.sqlite").read_bytes()


def test_llm_judge_needs_its_key_variable(judge_server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{KEY_ENV}, which is not set"):
        LLMJudge(llm_settings(judge_server, tmp_path), tmp_path)
    keyless = LLMJudge(llm_settings(judge_server, tmp_path, api_key_env=None), tmp_path)
    keyless.judge(*[x[:1] for x in pairs(1)])
    keyless.close()
    assert judge_server.requests[-1]["authorization"] is None


def test_judge_settings_are_validated():
    with pytest.raises(ConfigError, match="judge llm needs evaluation.llm"):
        load_config("lowlr", "smoke", {"evaluation.judge": "llm"})
    with pytest.raises(ConfigError, match="judge reward_model needs evaluation.reward_model"):
        load_config("lowlr", "smoke", {"evaluation.judge": "reward_model"})
    with pytest.raises(ConfigError) as error:
        load_config(
            "lowlr",
            "smoke",
            {
                "evaluation.judge": "llm",
                "evaluation.llm.base_url": "ftp://x",
                "evaluation.llm.model": "m",
                "evaluation.llm.api_key_env": SECRET,
            },
        )
    assert "evaluation.llm.base_url" in str(error.value) and "evaluation.llm.api_key_env" in str(error.value)
    assert SECRET not in str(error.value)  # a key pasted into the wrong field is not echoed
    with pytest.raises(ConfigError, match="evaluation.backend"):
        load_config("lowlr", "smoke", {"evaluation.backend": "tgi"})
    with pytest.raises(ConfigError, match="registry.promotion_ci_lower_bound"):
        load_config("lowlr", "smoke", {"registry.promotion_ci_lower_bound": 1.5})
    config = load_config(
        "lowlr",
        "smoke",
        {"evaluation.judge": "llm", "evaluation.llm.base_url": "http://127.0.0.1:9/v1/", "evaluation.llm.model": "m"},
    )
    assert (
        config.evaluation.llm.base_url == "http://127.0.0.1:9/v1"
        and config.evaluation.llm.api_key_env == "OPENAI_API_KEY"
    )
    assert config.evaluation.judge_settings() == config.evaluation.llm and config.evaluation.llm.model == "m"


# --------------------------------------------------------------------------------------------- the registry


def test_every_registered_judge_owns_its_settings_fingerprint_and_metrics():
    assert set(JUDGES) == {"gold", "reward_model", "llm"}
    for name in JUDGES:
        judge = judge_class(name)
        assert issubclass(judge, Judge) and judge.name == name
        assert issubclass(judge.settings_model, JudgeSettings) and judge.settings_model is not JudgeSettings
        assert judge.judge is not Judge.judge, f"{name} does not judge"
        for method in ("fingerprint", "check", "extra_metrics", "describe", "close"):
            assert callable(getattr(judge, method)), method
        # Its settings are the recipe section named after it, which no other evaluation setting may take.
        assert name not in EvaluationSettings.model_fields
        assert EvaluationConfig.model_fields[name].default is None
    assert judge_fingerprint(EvaluationConfig()) == {"judge": "gold", "gold": {}}
    evaluation = EvaluationConfig(judge="llm", llm={"base_url": "http://127.0.0.1:9/v1", "model": "a"})
    fingerprint = judge_fingerprint(evaluation)
    assert fingerprint["judge"] == "llm" and fingerprint["llm"]["model"] == "a"
    other = evaluation.model_copy(update={"llm": evaluation.llm.model_copy(update={"model": "b"})})
    assert judge_fingerprint(other) != fingerprint


def test_an_unknown_judge_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as error:
        load_config("lowlr", "smoke", {"evaluation.judge": "oracle"})
    assert "evaluation.judge: Value error, unknown judge 'oracle'; known: gold, reward_model, llm" in str(error.value)
    with pytest.raises(ConfigError, match="evaluation.oracle"):  # a section of no judge is an unknown key
        load_config("lowlr", "smoke", {"evaluation.oracle.x": 1})


def test_a_new_judge_is_one_class_and_one_registry_entry(tmp_path):
    """A judge registered before the config loads gets its section validated, with no edit to the config module."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        from pydantic import Field
        from post_train.judges import JUDGES, make_judge
        from post_train.judges.base import Judge, JudgeSettings, Verdict

        class CoinSettings(JudgeSettings):
            bias: float = Field(ge=0, le=1)

        class CoinJudge(Judge):
            name = "coin"
            settings_model = CoinSettings

            def judge(self, prompts, candidates, baselines):
                return [Verdict(self.settings.bias) for _ in candidates]

        JUDGES["coin"] = "__main__:CoinJudge"
        from post_train.config import ConfigError, load_config

        config = load_config("lowlr", "smoke", {"evaluation.judge": "coin", "evaluation.coin.bias": 0.25})
        print(make_judge(config.evaluation, "cache").judge([[]], ["a"], ["b"])[0].preference)
        for overrides in ({"evaluation.judge": "coin"}, {"evaluation.judge": "coin", "evaluation.coin.bias": 2}):
            try:
                load_config("lowlr", "smoke", overrides)
            except ConfigError as error:
                print(str(error).splitlines()[-1])
    """)
    repository = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repository)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "0.25"
    assert "judge coin needs evaluation.coin (at least bias)" in lines[1]
    assert lines[2].startswith("  evaluation.coin.bias:")


# --------------------------------------------------------------------------------------------- gold


def test_gold_judge_compares_exact_rewards_and_refuses_other_prompts(tmp_path):
    from post_train.data import EvalExample

    gold = GoldJudge(GoldJudgeSettings(), tmp_path)
    prompts = [[{"role": "user", "content": "Reverse: a b c"}]] * 3
    verdicts = gold.judge(prompts, ["c b a", "a b c", "c b a"], ["c b", "c b a", "c b a"])
    assert [v.preference for v in verdicts] == [1.0, 0.0, 0.5]
    assert verdicts[0].candidate_score == 1.0 and verdicts[0].baseline_score == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="demo-world prompts only"):
        gold.judge([[{"role": "user", "content": "Write a poem."}]], ["x"], ["y"])

    world = [EvalExample(prompt=prompts[0], reference="c b a", split="in_distribution")]
    gold.check(gold.settings, world)
    assert gold.extra_metrics(world, verdicts[:1]) == {}
    poem = EvalExample(prompt=[{"role": "user", "content": "Write a poem."}], reference="...", split="x")
    with pytest.raises(
        ConfigError, match="demo-world prompts only, and 1 of the 2 evaluation prompts are others.*Write a poem"
    ):
        gold.check(gold.settings, world + [poem])


# --------------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_model_dir(smoke_stages, tmp_path_factory) -> Path:
    """A tiny real reward model: LlamaForSequenceClassification (num_labels=1) with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from post_train.world.model import tiny_llama_config

    _, _, base = smoke_stages
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    config = tiny_llama_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    directory = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_judge_scores_with_the_chat_template_and_gives_soft_preferences(reward_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = [[{"role": "user", "content": f"Copy: {' '.join('abcdefgh'[: n + 1])}"}] for n in range(5)]
    outputs = ["a", "a b c", "b", "a b c d e f", "h h h h"]
    references = ["a", "a b", "a b c", "a b c d", "a b c d e"]
    judge = RewardModelJudge(RewardModelJudgeSettings(name_or_path=str(reward_model_dir), batch_size=2), tmp_path)
    verdicts = judge.judge(prompts, outputs, references)

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for prompt, output, verdict in zip(prompts, outputs, verdicts):
        ids = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": output}], tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            alone = float(model(input_ids=torch.tensor([list(ids)])).logits[0, 0])
        assert verdict.candidate_score == pytest.approx(alone, abs=1e-4)  # batching and padding change nothing
    assert verdicts[0].preference == 0.5 and verdicts[0].source == "identical"
    for verdict in verdicts[1:]:
        assert verdict.preference == pytest.approx(1 / (1 + math.exp(verdict.baseline_score - verdict.candidate_score)))
    swapped = judge.judge(prompts, references, outputs)
    assert [v.preference for v in swapped] == pytest.approx([1 - v.preference for v in verdicts])


def test_reward_model_judge_needs_one_label(reward_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(reward_model_dir)
    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(reward_model_dir).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has 2 labels"):
        RewardModelJudge(RewardModelJudgeSettings(name_or_path=str(tmp_path)), tmp_path)


def test_the_reward_model_judges_fingerprint_follows_its_weights(reward_model_dir, tmp_path):
    import shutil

    evaluation = EvaluationConfig(judge="reward_model", reward_model={"name_or_path": str(reward_model_dir)})
    fingerprint = judge_fingerprint(evaluation)
    assert fingerprint["weights"] == model_fingerprint(str(reward_model_dir))
    assert fingerprint["reward_model"]["name_or_path"] == str(reward_model_dir)
    copy = tmp_path / "retrained"
    shutil.copytree(reward_model_dir, copy)
    moved = EvaluationConfig(judge="reward_model", reward_model={"name_or_path": str(copy)})
    assert judge_fingerprint(moved)["weights"] == fingerprint["weights"]
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert judge_fingerprint(moved)["weights"] != fingerprint["weights"]
    judge = make_judge(evaluation, tmp_path)
    assert isinstance(judge, RewardModelJudge)
    assert judge.describe() == {"judge": "reward_model", "reward_model": str(reward_model_dir)}


def test_evaluate_with_the_reward_model_judge(smoke_stages, reward_model_dir, mlflow_store, tmp_path):
    from tasks import evaluate

    config, data, base = smoke_stages
    config = load_config(
        "lowlr",
        "smoke",
        {
            **_overrides(config),
            "evaluation.judge": "reward_model",
            "evaluation.reward_model.name_or_path": str(reward_model_dir),
        },
    )
    result = evaluate.run(config, base.path, data, str(tmp_path))
    metrics = result.metrics
    assert {"reward/all", "reference_reward/all", "gold_reward/all", "lc_win_rate/all"} <= set(metrics)
    samples = json.loads((tmp_path / "eval_samples.json").read_text())
    soft = [
        1 / (1 + math.exp(r - m)) if a != b else 0.5
        for m, r, a, b in zip(
            samples["response_score"], samples["reference_score"], samples["response"], samples["reference"]
        )
    ]
    assert metrics["win_rate/all"] == pytest.approx(sum(soft) / len(soft))
    hard = [1.0 if s > 0.5 else 0.0 if s < 0.5 else 0.5 for s in soft]
    assert metrics["win_rate_discrete/all"] == pytest.approx(sum(hard) / len(hard))


def _overrides(config) -> dict:
    return {"data.dvc_root": config.data.dvc_root, "cache_dir": config.cache_dir, "runs_dir": config.runs_dir}


# --------------------------------------------------------------------------------------------- the key stays secret


def test_the_llm_judges_api_key_never_reaches_mlflow(smoke_stages, judge_server, mlflow_store, tmp_path, monkeypatch):
    from tasks import evaluate

    monkeypatch.setenv(KEY_ENV, SECRET)
    config, data, base = smoke_stages
    overrides = {
        **_overrides(config),
        "cache_dir": str(tmp_path / "cache"),
        "evaluation.judge": "llm",
        "evaluation.llm.base_url": judge_server.base_url,
        "evaluation.llm.model": "judge-test",
        "evaluation.llm.api_key_env": KEY_ENV,
        "evaluation.llm.backoff_s": 0.01,
    }
    config = load_config("lowlr", "smoke", overrides)
    output = tmp_path / "out"
    output.mkdir()
    result = evaluate.run(config, base.path, data, str(output))
    asked = int(result.metrics["judge_requests"])
    assert asked == len(judge_server.requests) > 0
    assert all(r["authorization"] == f"Bearer {SECRET}" for r in judge_server.requests)
    assert 0.0 <= result.metrics["win_rate/all"] <= 1.0 and "lc_win_rate/held_out" in result.metrics

    # A rerun (same outputs: seeded generation) asks the endpoint nothing.
    again = evaluate.run(config, base.path, data, str(output))
    assert again.metrics["judge_requests"] == 0 and len(judge_server.requests) == asked
    assert again.metrics["win_rate/all"] == result.metrics["win_rate/all"]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.data.params["evaluation.llm.api_key_env"] == KEY_ENV
    assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files) and any(path.name == "eval_samples.json" for path in files)
    assert any(path.name == "llm_judge.sqlite" for path in files)
    leaked = [str(path) for path in files if SECRET.encode() in path.read_bytes()]
    assert leaked == []
