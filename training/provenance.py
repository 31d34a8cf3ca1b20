"""Where a written result came from: the command, the date, the machine and the commit, as the header every
results file carries (`san study run --out`, `make bench`). No torch import unless a GPU is asked about."""

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, root: Path = ROOT) -> str | None:
    """``git <args>``'s output in the checkout at ``root``, None where there is no git or no checkout."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def commit(root: Path = ROOT) -> str:
    """``git rev-parse --short HEAD`` of the checkout, ``+ changes`` when tracked files differ from it."""
    head = git("rev-parse", "--short=12", "HEAD", root=root)
    dirty = git("status", "--porcelain", "--untracked-files=no", root=root)
    if head is None or dirty is None:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu() -> str:
    import torch  # here, not at the top: report writers need no torch otherwise

    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return ", ".join(names) + f" (CUDA {torch.version.cuda})"


def machine() -> dict[str, str]:
    """The machine a result was measured on, as a two-column table's rows."""
    import psutil

    physical = psutil.cpu_count(logical=False)
    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical" + (f", {physical} physical" if physical else ""),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        **{package: version(package) for package in ("torch", "ray", "ffcv", "mlflow", "fastapi")},
        "GPU": gpu(),
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command as a reader would type it: ``san study run …`` for the console script, else the argv."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "san":
        argv[0] = "san"
    return shlex.join(argv)


def header(
    command: str, started: datetime, info: dict[str, str] | None = None, root: Path = ROOT, revision: str | None = None
) -> str:
    """Markdown: the command, when it ran (start and end, UTC), the commit (``revision``: `commit` read when it
    started; else now) and the machine."""
    info = machine() if info is None else info
    ended = datetime.now(UTC)
    lines = [
        f"Written by `{command}`, run {started:%Y-%m-%d %H:%M}–{ended:%Y-%m-%d %H:%M} UTC at commit "
        f"`{revision or commit(root)}`, on:",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    return "\n".join(lines) + "\n"
