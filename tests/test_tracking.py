"""MLflow helpers when stages run at once: a dataset that another stage logged between this one's lookup and
insert (MLflow's get-or-create is not atomic; seen when two compare cells' DPO stages started together)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from post_train.tracking import experiment_id, log_dataset

UNIQUE_FAILURE = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, ..."


def test_a_dataset_another_stage_logged_meanwhile_is_linked_all_the_same(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
):
    source = tmp_path / "preferences.jsonl"
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    real = mlflow.log_input
    calls = []

    def raced(dataset, context=None, **kwargs):
        calls.append(context)
        if len(calls) == 1:  # the other stage's insert lands first; this one's is rolled back, as the store does
            with mlflow.start_run(nested=True):
                real(dataset, context=context, **kwargs)
            raise MlflowException(UNIQUE_FAILURE)
        return real(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", raced)
    with mlflow.start_run(experiment_id=experiment_id()) as run:  # where a stage's run goes
        log_dataset(str(source), "preferences", "7f2f4207b25d12a0b8f1a42daddfb4b9", "training")
    inputs = MlflowClient(mlflow.get_tracking_uri()).get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("preferences", "7f2f4207b25d12a0b8f1a42daddfb4b9")]
    assert calls == ["training", "training"]
