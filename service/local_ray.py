"""A Ray head with dashboard that this process starts and stops by PID (never ``ray stop``, which would end every
Ray process on the machine): the API's local mode, ``san stack`` and the tests."""

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.ray_jobs import auth_token


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports no process listens on now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def saved_auth_token() -> str:
    """A new cluster token, saved 0600 where Ray's own clients on this machine read one (as Ray's first ``ray.init``
    saves its own), unless another process saved one there first: then that one."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # created 0600
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(token)
        os.link(temp, path)  # whole or not at all, and never over a token that is there
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        os.unlink(temp)
    return token


def node_env(env: dict[str, str], token: str) -> dict[str, str]:
    """The environment of a ``ray start`` this machine runs (a head, or a node joining it)."""
    # The node's processes pass their environment on to the job supervisors and drivers they start: a job's
    # `ray.init()` finds the token there.
    node = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Ray 2.60's SIGTERM handler first drains the node for Serve, up to 30 s, and a node that has run a Train job
    # never reads as idle (its autoscaling coordinator actor holds a lease): every stop took the whole 30 s. These
    # nodes serve no Serve traffic, so they skip the drain and stop in about 2 s.
    node.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return node


class LocalRayHead:
    """``ray start --head --block`` with the dashboard, in its own process group, so stopping it ends exactly the
    processes it started. Its temp dir is short and private: Ray's socket paths have a length limit.

    Token authentication is always on (``RAY_AUTH_MODE=token``: Ray 2.60's ``ray start`` turns it on only when it
    finds a token). The token: ``token``, else ``RAY_AUTH_TOKEN`` of ``env``, else the one Ray's clients on this
    machine use (`auth_token`), else a new one saved where they look (`saved_auth_token`); it is ``self.token``."""

    def __init__(
        self,
        port: int,
        dashboard_port: int,
        num_cpus: int | None,
        env: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.port, self.dashboard_port, self.num_cpus = port, dashboard_port, num_cpus
        env = dict(os.environ if env is None else env)
        self.token = token or env.get("RAY_AUTH_TOKEN") or auth_token(None) or saved_auth_token()
        self.env = node_env(env, self.token)
        self.process: subprocess.Popen | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="san-ray-")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90) -> None:
        ray = Path(sys.executable).parent / "ray"  # the venv's, beside the interpreter
        command = [
            str(ray) if ray.exists() else "ray",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={self.port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
        ]
        # The dashboard agent's HTTP port is fixed by default (52365): a second cluster on this machine (a `san train`
        # run's, a test's) finds it taken and its job submissions hang. A free port, asked of the OS, instead. Only
        # that one: Ray picks the other agents' ports itself, and each port picked here can be taken before Ray binds
        # it (a runtime-env agent given one that was lost that race, and the head died).
        command.append(f"--dashboard-agent-listen-port={free_ports(1)[0]}")
        if self.num_cpus:
            command.append(f"--num-cpus={self.num_cpus}")
        log = open(Path(self.temp_dir) / "head.log", "wb")  # noqa: SIM115 - the head outlives this call
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{self.address}/api/version", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray head not answering at {self.address} after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to ``ray start`` alone — it ends its own processes in order (a group-wide SIGTERM leaves it
        waiting) — then SIGKILL to whatever of the group is left."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
