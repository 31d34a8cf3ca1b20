"""``san stack up|down|status``: the deployed topology as processes on this machine — a Ray head with dashboard, a
second Ray node joined with ``ray start --address`` (one CPU each, so a 2-worker job spans both), PostgreSQL (the
Debian package, its own data dir and port), an ``mlflow server`` on it serving a local artifact store, and the API
pointed at all of them. Token authentication stays on for Ray and for the API, and PostgreSQL asks for a password
(SCRAM), a new one each ``up``.

``up`` writes what it started (PIDs, ports, dirs, tokens, the password) to ``<dir>/stack.json`` (mode 0600) as it
goes, so ``down`` — from any process — stops exactly those, by PID (never ``ray stop``); a failed ``up`` stops what
it had started.
"""

import contextlib
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import psutil

from service.auth import hash_token
from service.local_ray import LocalRayHead, free_ports, node_env
from training.data.manifest import write_atomically

BIN = Path(sys.executable).parent
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"


class StackError(RuntimeError):
    """The stack could not start or stop; the message says which part and where its log is."""


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` by rename, readable by its owner alone from before the first byte (it holds secrets):
    `write_atomically`'s temp file is mkstemp's, created 0600, and keeps its mode through the rename."""
    write_atomically(path, lambda temp: temp.write_text(text))


def postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not versions:
        raise StackError("PostgreSQL is not installed (make setup installs the Debian package 'postgresql')")
    return versions[-1].parent


# Replaces a reused data dir's pg_hba.conf: one an older `up` made with trust auth must not stay open.
PASSWORD_HBA = (
    "# san stack: TCP on 127.0.0.1 only, every user with its password\nhost all all 127.0.0.1/32 scram-sha-256\n"
)


class PostgresCluster:
    """A PostgreSQL cluster in ``directory`` on ``port``, TCP on 127.0.0.1 only, for user ``san``: with its
    ``password`` (SCRAM) — the stack's — or, without one, trust auth (for a test's own throwaway cluster alone).
    PostgreSQL refuses to run as root, so as root it runs as the 'postgres' user that the Debian package creates."""

    def __init__(self, directory: Path, port: int, password: str | None = None) -> None:
        self.dir, self.port, self.bin, self.password = Path(directory), port, postgres_bin(), password
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        # The password goes in the environment (libpq's PGPASSWORD), which `ps` does not show, never on argv.
        env = {**os.environ, "PGPASSWORD": self.password} if self.password else None
        result = subprocess.run(
            [*self.as_user, *command], input=stdin, capture_output=True, text=True, timeout=120, env=env
        )
        if result.returncode != 0:
            raise StackError(f"{Path(command[0]).name} failed: {(result.stderr or result.stdout).strip()}")
        return result

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
            if subprocess.run([*self.as_user, "test", "-x", str(self.dir)], check=False).returncode != 0:
                raise StackError(f"PostgreSQL runs as 'postgres' and cannot reach {self.dir}: let others enter its "
                                 "parent directories (chmod o+x), or choose another --dir")  # fmt: skip
        if not (self.dir / "data" / "PG_VERSION").exists():
            self.initdb()
        elif self.password:
            self.set_password()
        # -k '': no Unix socket (its path has a length limit a deep directory can exceed); TCP only.
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-p {self.port} -k '' -h 127.0.0.1", "start")  # fmt: skip

    def initdb(self) -> None:
        data = str(self.dir / "data")
        if not self.password:
            self.run(str(self.bin / "initdb"), "-D", data, "-U", "san", "--auth=trust", "-E", "UTF8")
            return
        descriptor, pwfile = tempfile.mkstemp(dir=self.dir, prefix=".pwfile-")  # 0600; initdb reads it, then it goes
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(self.password + "\n")
            if self.as_user:
                shutil.chown(pwfile, "postgres", "postgres")
            self.run(
                str(self.bin / "initdb"),
                "-D",
                data,
                "-U",
                "san",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
            )
        finally:
            Path(pwfile).unlink(missing_ok=True)

    def set_password(self) -> None:
        """A data dir an earlier ``up`` made: its password left with that stack's state file. The server is down, so
        single-user mode (no connection, no password) sets this one, read from stdin; and only it lets anyone in."""
        literal = self.password.replace("'", "''")
        result = self.run(
            str(self.bin / "postgres"),
            "--single",
            "-D",
            str(self.dir / "data"),
            "postgres",
            stdin=f"ALTER ROLE san PASSWORD '{literal}';\n",
        )
        if "ERROR" in result.stdout + result.stderr:  # single-user mode reports a failed statement, yet exits 0
            raise StackError(f"setting PostgreSQL's password in {self.dir} failed: {result.stderr.strip()}")
        (self.dir / "data" / "pg_hba.conf").write_text(PASSWORD_HBA)  # in place: its owner and mode stay

    def create_database(self, name: str) -> str:
        """A database (created unless it exists) and its SQLAlchemy URL."""
        exists = self.run(
            str(self.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "san",
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
        )
        if exists.stdout.strip() != "1":
            self.run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "san", name)
        return self.url(name)

    def url(self, name: str) -> str:
        user = f"san:{quote(self.password, safe='')}" if self.password else "san"
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{name}"

    def pid(self) -> int | None:
        pid_file = self.dir / "data" / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        if self.pid() is not None:
            self.run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")


@dataclass
class StackState:
    """What ``up`` started, as written to ``stack.json``; process ids are their process groups' leaders."""

    dir: str
    ports: dict[str, int]
    api_token: str
    ray_token: str
    ray_temp_dir: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    postgres_dir: str = ""
    postgres_password: str = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ports['ray']}"

    def save(self) -> None:
        write_private(Path(self.dir) / STATE_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> "StackState | None":
        path = Path(directory) / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of this process counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


# MLflow 3's server starts a GenAI job runner beside itself — 8 more Python processes, each importing mlflow — that
# this project never uses: off, the server starts in about a third of the time and holds 8 fewer processes.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def stop_group(pid: int, timeout_s: float = 30) -> None:
    """SIGTERM to the group's leader alone (``ray start --block`` then ends its own processes in order), then
    SIGKILL to whatever of its group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def group_members(groups: set[int]) -> list[int]:
    """Live processes (not zombies) whose process group is one of ``groups``."""
    members = []
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
    return members


def wait_until(probe, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if probe():
                return
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s" + (f"; its log: {log}" if log else ""))


def port_free(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return False
    return True


class LocalStack:
    """Start and stop the stack in ``directory`` (its storage root, MLflow artifacts, PostgreSQL data, logs)."""

    def __init__(self, directory: Path, data_root: Path | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.data_root = Path(data_root or os.environ.get("SAN_DATA_ROOT", "data")).resolve()

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def up(self, api_port: int = 0, mlflow_port: int = 0, dashboard_port: int = 0, timeout_s: float = 120
           ) -> StackState:  # fmt: skip
        """Start every part (0: a free port) and wait until the API answers ``/readyz`` with both nodes alive."""
        if (existing := StackState.load(self.dir)) and any(alive(pid) for pid in existing.pids.values()):
            raise StackError(f"a stack from {self.dir} is running (api {existing.api_url}); `san stack down` first")
        wanted = {"api": api_port, "mlflow": mlflow_port, "dashboard": dashboard_port}
        for name, port in wanted.items():
            if port and not port_free(port):
                raise StackError(f"port {port} ({name}) is in use: choose another with --{name}-port")
        free = iter(free_ports(6))
        ports = {name: port or next(free) for name, port in wanted.items()}
        ports |= {"postgres": next(free), "ray": next(free), "node2_agent": next(free)}
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # PostgreSQL runs as 'postgres' under root and must reach its data dir
        state = StackState(
            str(self.dir),
            ports,
            api_token=secrets.token_urlsafe(24),
            ray_token=secrets.token_hex(32),
            postgres_password=secrets.token_urlsafe(24),
        )
        state.save()
        try:
            self._start(state, timeout_s)
        except BaseException:
            self.down(state)
            raise
        return state

    def ray_env(self, state: StackState) -> dict[str, str]:
        return node_env(dict(os.environ), state.ray_token)

    def _spawn(self, state: StackState, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log(name), "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                       start_new_session=True)  # fmt: skip
        state.pids[name] = process.pid
        state.save()
        return process

    def _start(self, state: StackState, timeout_s: float) -> None:
        postgres = PostgresCluster(self.dir / "postgres", state.ports["postgres"], state.postgres_password)
        state.postgres_dir = str(postgres.dir)
        state.save()
        postgres.start()
        service_db, mlflow_db = postgres.create_database("san"), postgres.create_database("mlflow")

        artifacts = self.dir / "mlflow-artifacts"
        # The store's URL holds the password: in the environment (mlflow reads it there), not on argv, which `ps` shows.
        mlflow = self._spawn(
            state,
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(state.ports["mlflow"]),
                "--workers",
                "1",
            ],
            {**os.environ, **MLFLOW_SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": mlflow_db},
        )

        head = LocalRayHead(state.ports["ray"], state.ports["dashboard"], num_cpus=1, token=state.ray_token)
        state.ray_temp_dir = head.temp_dir
        try:
            head.start(timeout_s)
        finally:
            if head.process is not None:
                state.pids["ray-head"] = head.process.pid
                state.save()
        ray = BIN / "ray"
        self._spawn(state, "ray-node2", [
            str(ray), "start", "--block", "--disable-usage-stats", f"--address={state.ray_address}", "--num-cpus=1",
            f"--dashboard-agent-listen-port={state.ports['node2_agent']}"], self.ray_env(state))  # fmt: skip
        headers = {"Authorization": f"Bearer {state.ray_token}"}
        wait_until(lambda: len(self.alive_nodes(state, headers)) == 2, timeout_s, "the second Ray node",
                   self.log("ray-node2"))  # fmt: skip

        tokens = json.dumps({"stack": hash_token(state.api_token)})
        env = {**self.ray_env(state), "SAN_DATABASE_URL": service_db, "SAN_RAY_ADDRESS": state.dashboard_url,
               "SAN_RAY_AUTH_TOKEN": state.ray_token, "SAN_MLFLOW_URI": state.mlflow_url,
               "SAN_MLFLOW_UI_URL": state.mlflow_url, "SAN_STORAGE_ROOT": str(self.dir / "storage"),
               "SAN_DATA_ROOT": str(self.data_root), "SAN_TOKENS": tokens}  # fmt: skip
        api = self._spawn(state, "api", [str(BIN / "san"), "serve", "--host", "127.0.0.1",
                                         "--port", str(state.ports["api"])], env)  # fmt: skip
        for name, process in (("mlflow", mlflow), ("api", api)):
            url = state.mlflow_url + "/health" if name == "mlflow" else state.api_url + "/readyz"

            def ready(process=process, url=url, name=name) -> bool:
                if process.poll() is not None:
                    raise StackError(f"{name} exited with {process.returncode}; its log: {self.log(name)}")
                return httpx.get(url, timeout=5).status_code == 200

            wait_until(ready, timeout_s, name, self.log(name))
        self.write_env(state)

    @staticmethod
    def alive_nodes(state: StackState, headers: dict[str, str]) -> list[dict]:
        response = httpx.get(f"{state.dashboard_url}/api/v0/nodes", params={"detail": 1}, headers=headers, timeout=5)
        response.raise_for_status()
        return [n for n in response.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def write_env(self, state: StackState) -> Path:
        """``source`` it to point the CLI, Ray's and MLflow's clients at this stack."""
        path = self.dir / ENV_FILE
        lines = {"SAN_API_URL": state.api_url, "SAN_API_TOKEN": state.api_token,
                 "MLFLOW_TRACKING_URI": state.mlflow_url, "RAY_ADDRESS": state.dashboard_url,
                 "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": state.ray_token}  # fmt: skip
        write_private(path, "".join(f"export {key}={value}\n" for key, value in lines.items()))
        return path

    def down(self, state: StackState | None = None) -> list[str]:
        """Stop what ``up`` started, API first and PostgreSQL last; the names of what was running."""
        state = state or StackState.load(self.dir)
        if state is None:
            return []
        stopped = []
        for name in ("api", "ray-node2", "ray-head", "mlflow"):
            pid = state.pids.get(name)
            if pid and alive(pid):
                stop_group(pid)
                stopped.append(name)
            elif pid:  # the leader is gone (a node lost), its group may not be: a raylet's agents outlive it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(set(state.pids.values())) and time.monotonic() < deadline:
            time.sleep(0.2)
        if state.postgres_dir:
            postgres = PostgresCluster(Path(state.postgres_dir), state.ports["postgres"], state.postgres_password)
            if (pid := postgres.pid()) and alive(pid):
                postgres.stop()
                stopped.append("postgres")
        if state.ray_temp_dir:
            shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        (self.dir / ENV_FILE).unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, bool] | None:
        state = StackState.load(self.dir)
        if state is None:
            return None
        running = {name: alive(pid) for name, pid in state.pids.items()}
        postgres_pid = PostgresCluster(Path(state.postgres_dir), state.ports["postgres"]).pid()
        running["postgres"] = bool(postgres_pid and alive(postgres_pid))
        return running
