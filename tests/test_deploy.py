"""The deploy/ manifests parse, carry what a GPU cluster needs, and name real agft commands."""

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import _parser
from pipeline.cluster import gpu_workers, placement_problem
from pipeline.config.loading import load_config
from pipeline.config.schema import with_overrides

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


K8S_VERSION = "1.33.0"  # the Kubernetes API the pod templates are checked against
KUBERAY = Path(__file__).resolve().parent / "schemas" / "kuberay"  # see the files' headers for their source


def _strict(schema):
    """kubectl's strict field validation: an object schema with listed properties takes no others
    (a misspelt field is an error, not silently pruned), unless it preserves unknown fields."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema = {**schema, "additionalProperties": False}
        return {k: _strict(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _kuberay_validator(kind: str):
    """KubeRay's CRD schema for `kind`, its pod templates and Service resolved to the Kubernetes API's
    own (strict) schemas shipped by kubernetes-validate."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    k8s_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    definitions = json.loads((k8s_dir / "_definitions.json").read_text())
    schema = yaml.safe_load((KUBERAY / f"ray.io_{kind.lower()}s.spec.yaml").read_text())
    if kind == "RayJob":  # its rayClusterSpec is RayCluster's spec
        cluster = yaml.safe_load((KUBERAY / "ray.io_rayclusters.spec.yaml").read_text())
        schema["properties"]["spec"]["properties"]["rayClusterSpec"] = cluster["properties"]["spec"]
    schema = _strict(json.loads(json.dumps(schema).replace('"k8s:', f'"{definitions["$id"]}#/$defs/')))
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_validate_against_kuberays_crd_schema(name, kind):
    (doc,) = _docs(DEPLOY / "kuberay" / name)
    validator = _kuberay_validator(kind)
    assert _errors(validator, doc) == []
    typo = copy.deepcopy(doc)
    spec = typo["spec"] if kind == "RayCluster" else typo["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["minReplica"] = spec["workerGroupSpecs"][0].pop("minReplicas")
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    spec["authOptions"]["mode"] = "password"
    found = "\n".join(_errors(validator, typo))
    assert "minReplica" in found and "volumeMount" in found and "'password' is not one of" in found


def test_core_manifests_validate_against_the_kubernetes_api():
    import kubernetes_validate

    docs = _docs(DEPLOY / "mlflow" / "mlflow-server.yaml") + _docs(DEPLOY / "kuberay" / "storage.yaml")
    assert sorted(d["kind"] for d in docs) == [
        "Deployment",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "Service",
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"] == {"mode": "token", "secretName": "agft-ray-token"}  # submitter included
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    head = head_pod["containers"][0]
    assert head["image"] and head["resources"]["requests"]["cpu"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in head_pod["volumes"]}
    storage = {d["metadata"]["name"] for d in _docs(DEPLOY / "kuberay" / "storage.yaml")}
    assert set(claims.values()) == storage == {"agft-cache", "agft-datasets", "agft-weights"}
    config = load_config("vitb32_imagenet")
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups, "no GPU worker group"
    for pod in [head_pod] + [g["template"]["spec"] for g in gpu_groups]:
        container = pod["containers"][0]
        assert container["image"] == head["image"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["cache"] == config.cache_dir  # the shipped config's cache_dir is the shared volume
        assert all(d.root.startswith(mounts["data"]) for d in config.data.zero_shot + [config.data.train])
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_CACHE"].startswith(mounts["weights"])
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the user can write
    for group in gpu_groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    # KubeRay's autoscaler sizes each group between its bounds; a CPU-only group takes the decoding and GPU-free tasks
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    assert any(
        "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        for g in spec["workerGroupSpecs"]
    )
    # the shipped config's trainer takes one worker per GPU of the groups at their maximum, and fits them
    head = {"CPU": float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))}
    groups = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append(
            ({"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}, group["maxReplicas"])
        )
    gpus = sum(resources["GPU"] * count for resources, count in groups)
    assert config.train.num_workers == "auto" and gpus >= 16
    workers = gpu_workers(config.train, [head], groups)
    assert workers == gpus  # every GPU trains
    at_max = [head] + [resources for resources, count in groups for _ in range(count)]
    resolved = with_overrides(config, {"train.num_workers": workers})
    assert placement_problem(resolved, at_max, groups) == (None, False)
    assert config.train.use_gpu and config.resources.task_gpus > 0
    # every GPU process decodes its images with the CPUs it asks for beside its own
    assert config.resources.loader_processes(config.train.cpus_per_worker) == config.train.cpus_per_worker - 1
    assert config.resources.loader_processes(config.resources.task_cpus) == config.resources.task_cpus - 1


def _check_entrypoint(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[0] == "agft"
    args = _parser().parse_args(argv[1:])  # a real subcommand with real flags
    load_config(args.config, args.overrides)  # and a config that validates (a shipped name or a path)


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
    # each request's password check is cached, not an scrypt hash (~0.1 s of CPU) per metric or artifact call
    assert int(re.search(r"auth_cache_ttl_seconds = (\d+)\\n", command).group(1)) > 0
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
    assert not any(
        "--gpus" in o for o in doc["docker"].get("run_options", []) + doc["docker"].get("head_run_options", [])
    )
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
    # pyproject's data packages, read for their data files: without their dependencies (transformers)
    assert "pip install --no-cache-dir --no-deps -r /tmp/data-packages.txt" in text[:sources]
    assert "['tool']['agft']['data-packages']" in text[:sources]
    # the install writes build files into the working directory: the image's user (not root) made it
    workdir = next(line.split()[1] for line in lines if line.startswith("WORKDIR"))
    assert text.index(f"RUN mkdir -p {workdir}") < text.index("WORKDIR") and "USER root" not in text


def test_the_shipped_configs_are_package_data(tmp_path, monkeypatch):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("agft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"pipeline/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= names
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the packaged files
    assert load_config("vitb32_imagenet").model.arch == "ViT-B-32"
    assert load_config("configs/vitb32_imagenet.yaml") == load_config("vitb32_imagenet")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    load_config(path)
