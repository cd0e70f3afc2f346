"""The original teacher is registered once per weights digest, also when two runs register it at once."""
from mlflow.tracking import MlflowClient

from pipeline import registry


def _register_original(client: MlflowClient, experiment_id: str, digest: str):
    """What a run does once it found no original registered (registry.register without the pyfunc files)."""
    run = client.create_run(experiment_id)
    tags = {"role": registry.ORIGINAL, "weights_digest": digest}
    logged = client.create_logged_model(experiment_id, name="agft-original", source_run_id=run.info.run_id, tags=tags)
    client.finalize_logged_model(logged.model_id, "READY")
    return client.create_model_version("agft", logged.artifact_location, run.info.run_id, tags=tags,
                                       model_id=logged.model_id)


def test_two_runs_that_registered_the_original_at_once_leave_one_version(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("agft", artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_registered_model("agft")
    other_teacher = _register_original(client, experiment_id, "b" * 16)
    # both runs looked, found none and registered: the race's worst order, each checks after both registered
    first, second = (_register_original(client, experiment_id, "a" * 16) for _ in range(2))
    assert registry.keep_first_original(uri, second, "a" * 16).version == first.version
    assert registry.keep_first_original(uri, first, "a" * 16).version == first.version
    remaining = client.search_model_versions("name = 'agft'")
    assert sorted(int(v.version) for v in remaining) == sorted(int(v.version) for v in (other_teacher, first))
    assert registry.original_version(uri, "agft", "a" * 16).version == first.version
    # the deleted version's logged model went with it
    assert {m.artifact_location for m in client.search_logged_models([experiment_id])} == {other_teacher.source,
                                                                                             first.source}
