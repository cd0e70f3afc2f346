"""A real MLflow tracking server for tests: PostgreSQL (Debian's postgresql, a throwaway cluster) as
the backend and auth store, artifacts proxied by the server, HTTP basic auth on."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray_cluster import free_port

BIN = Path(sys.executable).parent


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    assert found[-1], f"{name} not found: install Debian's postgresql package (.ci/run does)"
    return found[-1]


@contextmanager
def postgres():
    """A PostgreSQL server on a free port; yields its URI prefix postgresql://agft@127.0.0.1:PORT/."""
    port, root = free_port(), Path(tempfile.mkdtemp(prefix="pgtest"))
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the package's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        run(_postgres_bin("initdb"), "-D", str(data), "-U", "agft", "--auth=trust")
        run(
            _postgres_bin("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "start",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        )
        stack.callback(run, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        for database in ("mlflow", "mlflow_auth"):
            run(_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "agft", database)
        yield f"postgresql://agft@127.0.0.1:{port}/"


@dataclass
class Server:
    uri: str
    username: str
    password: str
    artifacts: Path

    @property
    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def status_without_credentials(uri: str) -> int | None:
    """The HTTP status of an API call that sends no credentials; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # refused, or reset by a server still starting
        return None


def start_mlflow(args: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`mlflow server ARGS` on 127.0.0.1:PORT in a session of its own, its output in `log`; returned once it answers
    an API call (401 counts: it is up, and asks for credentials).

    Its job execution is off: agft submits no MLflow server jobs, and their runner and queue consumers (a dozen
    processes polling the store) cost 44 CPU-s in a server's first 40 s against 9 without (2026-12-07, 2 cores)."""
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:  # the child holds its own copy
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 180
    while status_without_credentials(f"http://127.0.0.1:{port}") not in (200, 401):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not come up: {log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


@contextmanager
def running_mlflow(args: list[str], log: Path, env: dict | None = None, port: int | None = None) -> Iterator[str]:
    """start_mlflow (on a free port unless given); yields its address, and stops it on the way out."""
    port = port or free_port()
    proc = start_mlflow(args, port, log, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def mlflow_server():
    with ExitStack() as stack:
        store = stack.enter_context(postgres())
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlflowtest")))
        password, port = secrets.token_urlsafe(16), free_port()
        (root / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {store}mlflow_auth\nadmin_username = admin\nadmin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 300\n"  # as deploy/mlflow has it: a password is hashed once, not per request
        )
        env = {
            **os.environ,
            "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        args = ["--app-name", "basic-auth", "--backend-store-uri", f"{store}mlflow"]
        args += ["--artifacts-destination", (root / "artifacts").as_uri()]
        args += ["--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
        uri = stack.enter_context(running_mlflow(args, root / "server.log", env, port))
        yield Server(uri, "admin", password, root / "artifacts")
