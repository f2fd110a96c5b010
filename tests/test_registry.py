from mlflow import MlflowClient

from tasks import register


def test_first_version_is_champion_and_only_a_better_one_takes_over(smoke_stages, mlflow_store):
    config, data, base = smoke_stages
    results = [register.run(config, base.path, rate, data.data_hash, flow_run_id=f"run-{i}")
               for i, rate in enumerate([0.40, 0.30, 0.60])]
    assert [r.is_champion for r in results] == [True, False, True]
    assert [r.previous_champion for r in results] == [None, "1", "1"]
    client = MlflowClient(mlflow_store)
    champion = client.get_model_version_by_alias("post-train", "champion")
    assert str(champion.version) == "3"
    assert champion.tags["recipe"] == "lowlr" and champion.tags["data_hash"] == data.data_hash
    assert champion.tags["flow_run_id"] == "run-2" and len(champion.tags["git_commit"]) in (40, 7)
    assert float(champion.tags["win_rate"]) == 0.6


def test_a_registered_model_loads_back_into_transformers(smoke_stages, mlflow_store, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, data, base = smoke_stages
    register.run(config, base.path, 0.5, data.data_hash)
    local = mlflow.artifacts.download_artifacts("models:/post-train@champion", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.config.vocab_size == len(tokenizer)
