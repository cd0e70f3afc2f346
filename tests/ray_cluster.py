"""Real Ray clusters for tests: a head and optional worker nodes as separate `ray start` processes on
this machine, every port their own (the session's local Ray holds Ray's defaults), token auth on."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tiny import sets

BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def dashboard_api(address: str, env: dict, path: str, submit: dict | None = None) -> requests.Response:
    """A call to the Ray dashboard's REST API (what `ray job` and `ray list` call) with the cluster's token: a GET,
    or a POST of `submit`. Waits poll through it, not the CLI, whose every call is a Python process starting Ray's
    (2 CPU-seconds, on a machine the test's cluster already keeps busy)."""
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    if submit is None:
        return requests.get(f"{address}{path}", headers=headers, timeout=60)
    return requests.post(f"{address}{path}", json=submit, headers=headers, timeout=60)


@dataclass
class Cluster:
    gcs_address: str  # what drivers pass as --address / RAY_ADDRESS
    dashboard: str  # what `ray job` and the state CLI take
    env: dict  # carries the token
    temp: str  # the head's
    # Each node's own temp dir. Raylets sharing one would share the job packages unpacked under it, and a worker
    # node's runtime-env agent that had not seen a package deletes the directory and unpacks it again
    # (overwrite=True), from under the driver running in it on the head: its os.getcwd() then fails.
    node_temps: list[str] = field(default_factory=list)


def _start(args: list[str], env: dict, temp: str) -> subprocess.Popen:
    """`ray start` of one node, its console in <temp>/ray-start.log (for the error if it dies)."""
    with open(Path(temp) / "ray-start.log", "w") as log:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _console(temp: str) -> str:
    return (Path(temp) / "ray-start.log").read_text()[-2000:]


def _stop(nodes: list[subprocess.Popen]) -> None:
    """SIGKILL, all at once, to each node this test started and only it. The cluster is thrown away with its temp
    dirs, and a graceful stop cost each test 15 s: after SIGTERM, a head's gcs_server and autoscaler monitor lived on
    for over 10 s (2026-12-07). The nodes' worker processes, each in a process group of its own, exit by themselves
    within about 2 s of their raylet."""
    for proc in nodes:
        with suppress(ProcessLookupError):  # a node that already died
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in nodes:
        proc.wait()


@contextmanager
def ray_cluster(head_cpus: int = 2, workers: list[dict] = (), preemption_watcher: bool = False):
    """workers: one dict per worker node, e.g. {"num-cpus": 2, "num-gpus": 1} (GPUs declared, not real).
    preemption_watcher: Ray Train's, an actor per fine-tune that waits for an autoscaler to drain a node; these
    nodes have no autoscaler, so by default it is off, as in the Ray `agft` starts for itself
    (pipeline.cli.local_ray_options): 2-3 CPU-s a fine-tune. Drivers and job drivers read it from `env`."""
    token = secrets.token_hex(32)
    temp = tempfile.mkdtemp(prefix="raytest", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{env['PATH']}"}
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = str(int(preemption_watcher))
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = Cluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env, temp)
    # Ray's own processes find their cluster through RAY_ADDRESS; without it, Ray Train's placement
    # group cleaner (the state API) sees this machine's other local Ray too, fails, and leaks the
    # placement group of every trainer that was killed.
    nodes_env = {**env, "RAY_ADDRESS": cluster.gcs_address}
    cluster.node_temps.append(temp)
    with ExitStack() as stack:
        # registered before the nodes' stop, so it runs after it
        stack.callback(lambda: [shutil.rmtree(t, True) for t in cluster.node_temps])
        head = _start(
            [
                "--head",
                f"--port={gcs_port}",
                f"--ray-client-server-port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--num-cpus={head_cpus}",
                f"--temp-dir={temp}",
                *(f"--{flag}={free_port()}" for flag in PORT_FLAGS),
            ],
            nodes_env,
            temp,
        )
        nodes = [head]
        stack.callback(_stop, nodes)
        # `job list` answers as soon as the dashboard does; a submission also needs the head's job
        # agent, which can come up later on a loaded machine: probe with a job that does nothing.
        deadline = time.time() + 300  # a loaded CI machine, not a test of speed
        while (probe := _submit_nothing(cluster)) is not True:
            assert time.time() < deadline and head.poll() is None, (
                f"the Ray head did not come up: {probe}, {_console(temp)}"
            )
            time.sleep(2)
        for count, resources in enumerate(workers, start=2):  # one at a time: two joining at once lost one
            # A worker node's `ray start` died once on a loaded machine (2026-12-07, its console not kept): it is
            # started once more, on new ports, and a second death fails with its console.
            for attempt in (1, 2):
                node_temp = tempfile.mkdtemp(prefix=f"raytest{count}-", dir="/tmp")
                cluster.node_temps.append(node_temp)
                node = _start(
                    [
                        f"--address={cluster.gcs_address}",
                        f"--temp-dir={node_temp}",
                        *(f"--{k}={v}" for k, v in resources.items()),
                        *(f"--{flag}={free_port()}" for flag in PORT_FLAGS),
                    ],
                    nodes_env,
                    node_temp,
                )
                nodes.append(node)
                deadline = time.time() + 300
                while _alive_nodes(cluster) < count and node.poll() is None:
                    assert time.time() < deadline, f"worker node {count - 1} did not join: {_console(node_temp)}"
                    time.sleep(2)
                if node.poll() is None:
                    break
                assert attempt == 1, f"worker node {count - 1} died twice starting: {_console(node_temp)}"
                print(f"worker node {count - 1} died starting, started again: {_console(node_temp)}")
        yield cluster


def _submit_nothing(cluster: Cluster) -> bool | str:
    """True once the head takes a job (`true`); else why not."""
    try:
        response = dashboard_api(cluster.dashboard, cluster.env, "/api/jobs/", {"entrypoint": "true"})
    except requests.RequestException as exc:
        return repr(exc)
    return response.ok or f"{response.status_code} {response.text[-2000:]}"


def _alive_nodes(cluster: Cluster) -> int:
    try:
        listed = dashboard_api(cluster.dashboard, cluster.env, "/api/v0/nodes?limit=1000")
    except requests.RequestException:
        return 0
    rows = listed.json()["data"]["result"]["result"] if listed.ok else []
    return sum(row["state"] == "ALIVE" for row in rows)


def agft_command(command: str, store: Path, overrides: list[str], *flags: str) -> tuple[list[str], str]:
    """The argv of `agft <command>` logging to a SQLite store in `store`, with --set for each override,
    and the store's URI. The store's schema is created now: two first users of one SQLite file race."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    argv = [str(BIN / "agft"), command, "--tracking-uri", uri, *flags]
    return argv + sets(overrides), uri


def state(cluster: Cluster, kind: str) -> list[dict]:
    """`ray list <kind> --detail` on the cluster, as dicts: its nodes, actors, tasks..."""
    flags = ("--detail", "--format", "json", "--limit", "10000")
    listed = ray_cli("list", kind, "--address", cluster.dashboard, *flags, env=cluster.env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)
