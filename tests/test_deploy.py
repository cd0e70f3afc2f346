"""The deploy/ manifests parse, carry what a GPU cluster needs, and name real agft commands."""
import json
import re
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


def test_mlflow_server_has_postgres_stores_object_store_and_auth_with_no_password_committed():
    deployment, service = _docs(DEPLOY / "mlflow" / "mlflow-server.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert "--backend-store-uri" in command and "postgresql://" in command
    assert "--artifacts-destination s3://" in command and "--app-name basic-auth" in command
    assert "--allowed-hosts" in command
    assert re.search(r"database_uri = %s.*postgresql://\S+/mlflow_auth", command)  # auth store: PostgreSQL
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_ADMIN_PASSWORD"]["valueFrom"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    extras = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert all(extra in extras for extra in ("mlflow[auth]", "psycopg", "boto3"))
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not re.search(r"(admin_password|PASSWORD)\s*[=:]\s*[\w-]{6,}", path.read_text()), path


def test_cluster_launcher_is_valid_for_ray_and_gives_gpus_to_gpu_nodes_only():
    import jsonschema
    import ray

    doc = yaml.safe_load((DEPLOY / "vm" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # the schema `ray up` itself validates against
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any("RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"])
    assert not any("--gpus" in o for o in doc["docker"].get("run_options", []) + doc["docker"].get("head_run_options", []))
    for name, node in doc["available_node_types"].items():
        gpu_options = any("--gpus" in o for o in node.get("docker", {}).get("worker_run_options", []))
        assert gpu_options == node["node_config"]["InstanceType"].startswith(("g", "p")), name


def test_dockerfile_builds_on_rays_gpu_image_with_dependencies_before_sources():
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "FROM rayproject/ray:2.60.0-py311-gpu"  # probes' wget, rsync, openssh, user ray
    text = "\n".join(lines)
    assert "|| true" not in text  # a failed install fails the build
    deps, sources = text.index("pip install --no-cache-dir -r"), text.index("COPY --chown=ray:users agft_core")
    assert deps < sources and "pip install --no-cache-dir --no-deps ." in text[sources:]


def test_the_shipped_configs_are_package_data(tmp_path, monkeypatch):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("agft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"pipeline/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= names
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the packaged files
    assert load_config("vitb32_imagenet").model.arch == "ViT-B-32"
    assert load_config("configs/vitb32_imagenet.yaml") == load_config("vitb32_imagenet")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    load_config(path)
