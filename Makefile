# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing is fetched from the Hugging Face Hub, and no tool phones home.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

RECIPE ?= lowlr
SCALE ?= demo

.PHONY: install demo serve test mlflow-ui prefect-ui clean sky-env test-sky bench bench-quick bench-gpu bench-demo

install: $(STAMP)

# requirements.lock pins every package to versions known to resolve together here, which
# also spares pip a long dependency search.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/post-train run --recipe $(RECIPE) --scale $(SCALE)

# Serves post-train/<recipe> for every recipe and retrain/scheduled (cron: $POST_TRAIN_RETRAIN_CRON,
# default 0 3 * * *) to the server at $PREFECT_API_URL, starting a local one if none answers.
serve: install
	$(BIN)/python -m flows.serve

# The linter and the formatter's check (rules in pyproject.toml), then the whole suite, SkyPilot's own validation of
# sky/*.yaml included (hence sky-env).
test: install sky-env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	SKYPILOT_DISABLE_USAGE_COLLECTION=1 $(BIN)/python -m pytest -q

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

prefect-ui: install
	$(BIN)/prefect server start

clean:
	rm -rf runs cache data mlflow.db mlartifacts

# post-train against TRL on the same model, data and optimizer (README, Benchmarks); results go to
# benchmarks/results/<name>.json and .md. BENCH_ARGS adds flags, e.g. BENCH_ARGS="--sizes 5m --tasks sft".
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m benchmarks.run --preset full --name bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m benchmarks.run --preset quick --name bench-quick $(BENCH_ARGS)

# On a CUDA GPU: bf16, a 1B random-init Llama with a 128k vocabulary, sequences up to 2048, MFU.
bench-gpu: install
	$(BIN)/python -m benchmarks.run --preset gpu --name bench-gpu $(BENCH_ARGS)

# The share of `make demo`'s wall time spent outside training and generation (fresh cache), warm-started
# stages against fresh processes, alternating, 3 runs each; DEMO_BENCH_ARGS overrides (e.g. --repetitions 1).
DEMO_BENCH_ARGS ?= --ab compute.warm_start=true,false --repetitions 3
bench-demo: install
	$(BIN)/python -m benchmarks.demo_overhead --recipe $(RECIPE) --scale $(SCALE) $(DEMO_BENCH_ARGS)

# SkyPilot, the client that launches stages on cloud GPUs (compute.backend: skypilot), in its own
# virtual environment: it pins click<8.2, which huggingface-hub and dvc cannot share. Add cloud
# extras with SKY_CLOUDS, e.g. `make sky-env SKY_CLOUDS=aws` or `SKY_CLOUDS=gcp,kubernetes`.
SKY_VENV := .sky-venv
SKYPILOT_VERSION ?= 0.14.1
SKY_CLOUDS ?=
comma := ,
SKY_STAMP := $(SKY_VENV)/.installed-$(SKYPILOT_VERSION)$(if $(SKY_CLOUDS),-$(subst $(comma),-,$(SKY_CLOUDS)))

sky-env: $(SKY_STAMP)

$(SKY_STAMP):
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SKY_VENV)/bin/python -m pip install --quiet 'skypilot$(if $(SKY_CLOUDS),[$(SKY_CLOUDS)])==$(SKYPILOT_VERSION)'
	touch $@

# The SkyPilot tests, with every task YAML in sky/ validated by SkyPilot itself (offline).
test-sky: install sky-env
	SKYPILOT_DISABLE_USAGE_COLLECTION=1 $(BIN)/python -m pytest -q tests/test_cloud.py
