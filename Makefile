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

.PHONY: install demo serve test mlflow-ui prefect-ui clean

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

test: install
	$(BIN)/python -m pytest -q

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

prefect-ui: install
	$(BIN)/prefect server start

clean:
	rm -rf runs cache data mlflow.db mlartifacts
