"""The registered version is an MLflow model: its signature and requirements, `mlflow.pyfunc` answering chat requests
as the evaluation generated, and `mlflow models serve` answering them over HTTP. The smoke-scale base model, registered
with `tasks.register`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from post_train.data import load_dataset_checked
from post_train.judging import generate_for
from post_train.modeling import load_tokenizer
from post_train.tracking import experiment_id
from tasks import register
from tasks.register import log_transformers_model, pinned_requirements
from tests.test_mlflow_ui import free_port, render, serving_mlflow_ui

SERVER_START_S = 120
PROMPTS = 4  # evaluation prompts asked through MLflow: enough to meet different answers


@pytest.fixture
def registered(smoke_stages, mlflow_store):
    """The smoke base registered as version 1 of a fresh store (the champion), with the evaluation prompts."""
    config, data, base = smoke_stages
    registration = register.run(config, base.path, 0.5, data)
    examples = load_dataset_checked(data.eval, "eval")[:PROMPTS]
    return config, base.path, registration, examples


def answer(reply: dict) -> str:
    """The assistant's message in an OpenAI chat completion (MLflow's `llm/v1/chat` output)."""
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    return choice["message"]["content"]


def test_the_registered_version_is_a_chat_model_that_answers_as_evaluated(registered):
    config, model_path, registration, examples = registered
    info = mlflow.models.get_model_info("models:/post-train@champion")
    assert info.model_uri and registration.model_uri == "models:/post-train/1"
    assert {"messages", "max_tokens", "temperature"} <= set(info.signature.inputs.input_names())
    assert "choices" in info.signature.outputs.input_names()
    flavor = info.flavors["transformers"]
    assert flavor["inference_task"] == "llm/v1/chat" and flavor["components"] == ["tokenizer"]
    assert config.evaluation.temperature == 0  # smoke scale decodes greedily
    assert info.flavors["python_function"]["config"] == {
        "max_new_tokens": config.evaluation.max_new_tokens,
        "do_sample": False,
    }
    assert info.saved_input_example_info["type"] == "json_object"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(registration.model_uri)).read_text().split()
    assert set(pinned_requirements()) <= set(requirements) and f"mlflow=={mlflow.__version__}" in requirements
    assert not any("+" in requirement for requirement in requirements)  # pip can install them from PyPI

    model = mlflow.pyfunc.load_model(registration.model_uri)
    served = [answer(model.predict({"messages": example.prompt})[0]) for example in examples]
    # Served with the evaluation's decoding settings: greedy, the same answers the evaluate stage judges.
    assert served == generate_for(config, model_path, load_tokenizer(model_path), examples)
    assert any(served)


def test_the_version_page_shows_the_chat_signature(registered, mlflow_store, tmp_path):
    """What a user browsing the registry sees: the version page, rendered by headless Chromium, lists the model's
    signature (as many inputs and outputs as the chat schema has fields) instead of "Inputs (0)"."""
    signature = mlflow.models.get_model_info("models:/post-train/1").signature
    inputs, outputs = len(signature.inputs.input_names()), len(signature.outputs.input_names())
    assert inputs > 1 and outputs > 1
    with serving_mlflow_ui(mlflow_store, tmp_path) as url:
        # Tall enough for the schema below the model card and the tags.
        text = render(f"{url}/#/models/post-train/versions/1", tmp_path, "mlflow-ui-signature.png", height=1400)
    assert "Version 1" in text, text[:3000]
    assert f"Schema | Name | Type | Inputs ({inputs}) | Outputs ({outputs})" in text, text[:3000]


def test_a_model_without_a_chat_template_is_logged_for_completions(smoke_stages, mlflow_store, tmp_path):
    """A model trained on text-format data has no chat template: it takes prompts (`llm/v1/completions`)."""
    config, _, base = smoke_stages
    plain = shutil.copytree(base.path, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink()
    assert load_tokenizer(str(plain)).chat_template is None
    with mlflow.start_run(experiment_id=experiment_id()):  # artifacts beside the test's store
        info = log_transformers_model(str(plain), config.evaluation)
    assert info.flavors["transformers"]["inference_task"] == "llm/v1/completions"
    assert "prompt" in info.signature.inputs.input_names()
    (reply,) = mlflow.pyfunc.load_model(info.model_uri).predict({"prompt": "reverse c a f b ="})
    assert isinstance(reply["choices"][0]["text"], str)


def wait_until_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log when it exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """End the server and the uvicorn workers it started (its own session, so its process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_mlflow_models_serve_answers_a_chat_request_over_http(registered, tmp_path):
    config, model_path, registration, examples = registered
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registration.model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow starts `uvicorn` from PATH: the environment's own, as an activated virtual environment has it.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/ping", server, log, SERVER_START_S)
        example = examples[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"messages": example.prompt, "max_tokens": config.evaluation.max_new_tokens}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (reply,) = json.load(response)  # one chat completion per request, not wrapped in `predictions`
    finally:
        stop(server)
    content = answer(reply)
    assert reply["object"] == "chat.completion" and content
    assert content == generate_for(config, model_path, load_tokenizer(model_path), [example])[0]
