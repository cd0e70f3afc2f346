"""The deploy/ manifests parse, carry what a GPU cluster needs, and name real agft commands."""
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import _parser
from pipeline.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["requests"]["cpu"]
    env = {e["name"]: e for e in head["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]


def _check_entrypoint(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[0] == "agft"
    args = _parser().parse_args(argv[1:])  # a real subcommand with real flags
    load_config(REPO / args.config, args.overrides)  # and a config that validates


def test_raycluster():
    (doc,) = _docs(DEPLOY / "kuberay" / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["spec"]["rayVersion"] == "2.60.0"
    _check_cluster_spec(doc["spec"])


def test_rayjob():
    (doc,) = _docs(DEPLOY / "kuberay" / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])
    _check_entrypoint(doc["spec"]["entrypoint"])


def test_mlflow_server_has_postgres_object_store_and_auth():
    deployment, service = _docs(DEPLOY / "mlflow" / "mlflow-server.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    command = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri" in command and "postgresql://" in command
    assert "--artifacts-destination s3://" in command and "--app-name basic-auth" in command
    assert "--allowed-hosts" in command
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_cluster_launcher():
    doc = yaml.safe_load((DEPLOY / "vm" / "cluster.yaml").read_text())
    assert doc["head_node_type"] in doc["available_node_types"]
    assert {"cluster_name", "provider", "max_workers"} <= set(doc)
    assert any("RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"])


def test_dockerfile_runs_as_non_root_with_the_project_installed():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER agft" in text and "pip install --no-cache-dir ." in text


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    load_config(path)
