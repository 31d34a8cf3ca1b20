"""``san serve`` runs the API (uvicorn); ``san jobs …`` talks to it over HTTP with a bearer token.

    san serve [--host 127.0.0.1] [--port 8000] [--env-file service.env]
    san jobs submit SPEC [--workers N] [--epochs N] [--wait]
    san jobs list [--status S] | show ID | cancel ID | logs ID [--tail N]
    printf %s "$TOKEN" | san jobs hash-token     # the value to put in SAN_TOKENS (the token from stdin)
    san study run SPEC [--seeds N] [--epochs N]      # on the local Ray, children one after another
    san study submit SPEC [--seeds N] [--epochs N] [--wait] | list | show ID | table ID [--format md] | cancel ID
    san stack up [--dir runs/stack] [--api-port 8000] [--mlflow-port 5000] [--dashboard-port 8265] | down | status
The client reads ``SAN_API_URL`` (default http://127.0.0.1:8000) and ``SAN_API_TOKEN`` (or ``--token-file PATH``).
Tokens never go on the command line: every local user sees it in ``ps``.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from training.states import JobStatus, StudyStatus

DEFAULT_URL = "http://127.0.0.1:8000"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    if args.env_file and not os.path.isfile(args.env_file):
        print(f"san serve: error: {args.env_file}: no such settings file", file=sys.stderr)
        return 2
    settings = ServiceSettings(_env_file=args.env_file) if args.env_file else ServiceSettings()
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _api_token(args: argparse.Namespace) -> str | None:
    """The token in ``--token-file``, else ``$SAN_API_TOKEN``; a one-line error (exit 2) for an unreadable or empty
    file."""
    if not args.token_file:
        return os.environ.get("SAN_API_TOKEN")
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as error:
        print(f"san {args.command}: error: --token-file {args.token_file}: {error.strerror}", file=sys.stderr)
        sys.exit(2)
    if not token:
        print(f"san {args.command}: error: --token-file {args.token_file} is empty", file=sys.stderr)
        sys.exit(2)
    return token


class _TokenOnCommandLine(argparse.Action):
    """``--token`` and ``hash-token TOKEN`` are refused: the token would be on the command line, which ``ps`` shows
    to every local user. The message does not repeat the token (argparse's own "unrecognized arguments" would)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", default=None, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string:
            parser.error(
                f"{option_string} is gone: a token on the command line shows in `ps`; give it in "
                "$SAN_API_TOKEN or in a file, --token-file PATH"
            )
        if values is not None:  # hash-token's positional (absent, argparse still calls with None)
            parser.error(
                f'the token is read from stdin, not the command line (`ps` shows that): printf %s "$TOKEN" | '
                f"{parser.prog}"
            )


def _client(args: argparse.Namespace):
    import httpx

    token = _api_token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=30)


def _fail(response) -> int:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # pydantic's errors: name the field of the first
        first = detail[0]
        detail = f"{'.'.join(str(p) for p in first.get('loc', [])[1:])}: {first.get('msg')}"
    print(f"san jobs: error: HTTP {response.status_code}: {detail}", file=sys.stderr)
    return 2


def _call(args: argparse.Namespace, method: str, path: str, **kwargs):
    import httpx

    try:
        with _client(args) as client:
            return client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        print(f"san jobs: error: cannot reach {args.url}: {error}", file=sys.stderr)
        sys.exit(2)


def _show(job: dict) -> str:
    progress = job.get("progress") or {}
    line = f"{job['id']}  {job['status']}"
    if progress:
        line += f"  epoch {progress['epoch']}/{progress['epochs']}"
        if progress.get("eta_s") is not None:
            line += f"  eta {progress['eta_s']:.0f} s"
    for key in ("val/top1", "val/top5", "val/cosine", "val/mae", "train/loss"):
        if key in job.get("metrics", {}):
            line += f"  {key} {job['metrics'][key]:.4f}"
    if job.get("mlflow_url"):
        line += f"  {job['mlflow_url']}"
    if queue := job.get("queue"):
        place = f"position {queue['position']}: " if queue.get("position") else ""
        line += f"\n  waiting: {place}{queue['reason']}"
        times = [f"{what} ≈ {queue[f'{what}_at'][:19]}" for what in ("starts", "ends") if queue.get(f"{what}_at")]
        if queue.get("estimate"):
            line += f"\n  {', '.join([*times, queue['estimate']])}"
    if job.get("error"):
        line += f"\n  error: {job['error']}"
    return line


def _submit(args: argparse.Namespace) -> int:
    from training.config import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.workers, args.epochs)
    except SpecError as error:
        print(f"san jobs: error: {error}", file=sys.stderr)
        return 2
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    response = _call(args, "POST", "/v1/jobs", json=spec.model_dump(mode="json"), headers=headers)
    if response.status_code not in (200, 201):
        return _fail(response)
    job = response.json()
    print(_show(job), flush=True)
    return _follow(args, job) if args.wait else 0


def _follow(args: argparse.Namespace, job: dict) -> int:
    """Print a line whenever the job's state or epoch changes, until it ends: exit 0 if it succeeded."""
    last = (job["status"], None)
    while not JobStatus(job["status"]).is_terminal():
        time.sleep(args.poll_s)
        response = _call(args, "GET", f"/v1/jobs/{job['id']}")
        if response.status_code != 200:
            return _fail(response)
        job = response.json()
        now = (job["status"], (job.get("progress") or {}).get("epoch"))
        if now != last:
            print(_show(job), flush=True)
            last = now
    return 0 if job["status"] == JobStatus.SUCCEEDED else 1


def _list(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    response = _call(args, "GET", "/v1/jobs", params=params)
    if response.status_code != 200:
        return _fail(response)
    for job in response.json()["items"]:
        print(_show(job))
    return 0


def _one(method: str, suffix: str = "", resource: str = "jobs", show=None):
    """A handler that calls ``METHOD /v1/<resource>/<id><suffix>`` and prints the answer (``--json``: all of it)."""

    def handler(args: argparse.Namespace) -> int:
        response = _call(args, method, f"/v1/{resource}/{args.id}{suffix}")
        if response.status_code != 200:
            return _fail(response)
        print(json.dumps(response.json(), indent=2) if args.json else (show or _show)(response.json()))
        return 0

    return handler


def sse_events(lines) -> Iterator[tuple[str, str | None, dict]]:
    """(event, id, data) of each server-sent event in ``lines`` (comments, such as the pings, skipped)."""
    kind, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield kind, event_id, json.loads("\n".join(data))
            kind, event_id, data = "message", None, []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


def _event_line(kind: str, data: dict) -> str:
    who = data.get("job_id", "")
    if "cell" in data:
        who += f" ({data['cell']}, seed {data['seed']})"
    if kind == "log":
        from rich.markup import escape  # a log line is text, not markup: "[1/15]" stays as it is

        return f"[dim]{escape(data['line'])}[/]"
    if kind == "epoch":
        metrics = "  ".join(f"{key} {value:.4f}" for key, value in data.items() if "/" in key and key != "time/epoch_s")
        return f"[cyan]{who}  epoch {data['epoch'] + 1}[/]  {metrics}"
    if kind == "end":
        colour = "green" if data["status"] == JobStatus.SUCCEEDED else "red"
        return f"[{colour}]{data.get('study_id') or who}  ended {data['status']}[/]" + (
            f": {data['error']}" if data.get("error") else ""
        )
    return f"{who}  {data['status']}  {str(data.get('at', ''))[:19]}"


def _watch(resource: str):
    """A handler that follows ``/v1/<resource>/<id>/events`` to its end, reconnecting (with ``Last-Event-ID``, so
    nothing is missed or shown twice) when the connection drops; exit 0 if it succeeded."""

    def handler(args: argparse.Namespace) -> int:
        import httpx
        from rich.console import Console

        console, last, tries = Console(highlight=False, soft_wrap=True), None, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with (
                    _client(args) as client,
                    client.stream("GET", f"/v1/{resource}/{args.id}/events", headers=headers) as response,
                ):
                    if response.status_code != 200:
                        response.read()
                        return _fail(response)
                    tries = 0
                    for kind, event_id, data in sse_events(response.iter_lines()):
                        last = event_id or last
                        if kind != "log" or getattr(args, "logs", False):
                            console.print(_event_line(kind, data))
                        if kind == "end":
                            return 0 if data["status"] == JobStatus.SUCCEEDED else 1
            except httpx.TransportError as error:
                tries += 1
                if tries > 30:
                    print(f"san {resource}: error: cannot reach {args.url}: {error}", file=sys.stderr)
                    return 2
                time.sleep(min(tries, 5))

    return handler


def _logs(args: argparse.Namespace) -> int:
    response = _call(args, "GET", f"/v1/jobs/{args.id}/logs", params={"tail": args.tail})
    if response.status_code != 200:
        return _fail(response)
    sys.stdout.write(response.text)
    return 0


def _study_run(args: argparse.Namespace) -> int:
    from training.study_run import run_study  # imports Ray and MLflow: only when training

    return run_study(args.spec, args.seeds, args.epochs, args.out)


def _study_line(study: dict) -> str:
    cells, jobs = study["cells"], study["jobs"]
    return f"{study['id']}  {study['name']}  {study['status']}  cells: " + \
        ", ".join(f"{n} {state}" for state, n in cells.items() if n) + \
        f"  (children: {', '.join(f'{n} {s}' for s, n in jobs.items())})"  # fmt: skip


def _study_submit(args: argparse.Namespace) -> int:
    from training.study import load_study

    try:
        study = load_study(args.spec, args.seeds, args.epochs)
    except (ValueError, FileNotFoundError) as error:
        print(f"san study: error: {error}", file=sys.stderr)
        return 2
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    response = _call(args, "POST", "/v1/studies", json=study.model_dump(mode="json"), headers=headers)
    if response.status_code not in (200, 201):
        return _fail(response)
    found = response.json()
    print(_study_line(found), flush=True)
    if not args.wait:
        return 0
    last = None
    while found["status"] == StudyStatus.RUNNING:
        time.sleep(args.poll_s)
        response = _call(args, "GET", f"/v1/studies/{found['id']}", params={"table": "false"})
        if response.status_code != 200:
            return _fail(response)
        found = response.json()
        line = _study_line(found) + _running_children(args, found)
        if line != last:
            print(line, flush=True)
            last = line
    table = _call(args, "GET", f"/v1/studies/{found['id']}/table", params={"format": "md"})
    print(table.text if table.status_code == 200 else "", flush=True)
    return 0 if found["status"] == StudyStatus.SUCCEEDED else 1


def _running_children(args: argparse.Namespace, study: dict) -> str:
    """``\n  running: <run name> epoch k/N`` for each of the study's children on the cluster now."""
    running = _call(args, "GET", "/v1/jobs", params={"status": JobStatus.RUNNING.value, "limit": 500})
    if running.status_code != 200:
        return ""
    lines = ""
    for job in running.json()["items"]:
        if job["id"] in study["job_ids"]:
            detail = _call(args, "GET", f"/v1/jobs/{job['id']}").json()
            progress = detail.get("progress") or {}
            epoch = f"  epoch {progress['epoch']}/{progress['epochs']}" if progress else ""
            lines += f"\n  running: {job['spec']['tracking']['run_name']}{epoch}"
    return lines


def _study_table(args: argparse.Namespace) -> int:
    response = _call(args, "GET", f"/v1/studies/{args.id}/table", params={"format": args.format})
    if response.status_code != 200:
        return _fail(response)
    sys.stdout.write(json.dumps(response.json(), indent=2) + "\n" if args.format == "json" else response.text)
    return 0


def _study_list(args: argparse.Namespace) -> int:
    response = _call(args, "GET", "/v1/studies", params={"limit": args.limit})
    if response.status_code != 200:
        return _fail(response)
    for study in response.json()["items"]:
        print(_study_line(study))
    return 0


def _hash_token(args: argparse.Namespace) -> int:
    """The hash of the token on stdin's first line; from a terminal, asked for without echo."""
    import getpass

    from service.auth import hash_token

    token = (getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not token:
        print(
            'san jobs hash-token: error: no token on stdin; e.g. printf %s "$TOKEN" | san jobs hash-token',
            file=sys.stderr,
        )
        return 2
    print(hash_token(token))
    return 0


def _stack(args: argparse.Namespace) -> int:
    from service.stack import LocalStack, StackError, StackState

    stack = LocalStack(args.dir)
    try:
        if args.action == "up":
            state = stack.up(args.api_port, args.mlflow_port, args.dashboard_port, args.timeout_s)
            print(f"API        {state.api_url}  (token: {state.api_token})")
            print(f"MLflow     {state.mlflow_url}  (PostgreSQL 127.0.0.1:{state.ports['postgres']}, artifacts served)")
            head = f"127.0.0.1:{state.ports['ray']}"
            print(f"Ray        {state.dashboard_url}  (head {head} + a second node, 1 CPU each)")
            print(f"logs       {stack.dir / 'logs'}")
            print(f"use it:    source {stack.dir / 'stack.env'}   then e.g. san jobs submit configs/lenet5-fmnist.yaml")
            print("stop it:   make stack-down")
        elif args.action == "down":
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else f"no stack running from {stack.dir}")
        else:
            running = stack.status()
            if running is None:
                print(f"no stack in {stack.dir}")
                return 1
            state = StackState.load(stack.dir)
            print(f"API {state.api_url}, MLflow {state.mlflow_url}, Ray {state.dashboard_url}")
            print("  ".join(f"{name}: {'up' if up else 'DOWN'}" for name, up in running.items()))
            return 0 if all(running.values()) else 1
    except StackError as error:
        print(f"san stack {args.action}: error: {error}", file=sys.stderr)
        return 2
    return 0


def register(commands) -> None:
    """Add ``san serve`` and ``san jobs`` to the ``san`` command line (entry point ``san.cli``)."""
    serve = commands.add_parser("serve", help="run the job service (FastAPI on uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--env-file", help="SAN_* settings in KEY=VALUE lines (environment variables win)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=_serve)

    jobs = commands.add_parser("jobs", help="submit and follow jobs through the service's REST API")
    jobs.add_argument("--url", default=os.environ.get("SAN_API_URL", DEFAULT_URL), help="the service's base URL")
    jobs.add_argument("--token-file", metavar="PATH", help="a file holding the bearer token (default: $SAN_API_TOKEN)")
    jobs.add_argument("--token", action=_TokenOnCommandLine)
    actions = jobs.add_subparsers(dest="action", required=True, parser_class=type(jobs))
    submit = actions.add_parser("submit", help="submit a JobSpec (YAML/JSON)")
    submit.add_argument("spec")
    submit.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    submit.add_argument("--workers", type=int, help="override scaling.num_workers")
    submit.add_argument("--epochs", type=int, help="override training.epochs")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends (exit 1 unless it succeeds)")
    submit.add_argument("--poll-s", type=float, default=2.0, help="seconds between polls with --wait")
    submit.set_defaults(handler=_submit)
    listing = actions.add_parser("list", help="your jobs, newest first")
    listing.add_argument("--status", choices=[status.value for status in JobStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=_list)
    for name, method, suffix, text in (("show", "GET", "", "one job"), ("cancel", "POST", "/cancel", "cancel a job")):
        action = actions.add_parser(name, help=text)
        action.add_argument("id")
        action.add_argument("--json", action="store_true", help="the whole job as JSON")
        action.set_defaults(handler=_one(method, suffix))
    watch = actions.add_parser("watch", help="follow a job's state changes and epochs live, to its end")
    watch.add_argument("id")
    watch.add_argument("--logs", action="store_true", help="also show each line of the job's log as it comes")
    watch.set_defaults(handler=_watch("jobs"))
    logs = actions.add_parser("logs", help="the Ray job's driver log")
    logs.add_argument("id")
    logs.add_argument("--tail", type=int, default=200)
    logs.set_defaults(handler=_logs)
    hashing = actions.add_parser(
        "hash-token",
        help="print the sha256 hash of the token on stdin, for SAN_TOKENS",
        description='The token is read from stdin (its first line): printf %s "$TOKEN" | '
        "san jobs hash-token; from a terminal it is asked for, not echoed.",
    )
    hashing.add_argument("token", action=_TokenOnCommandLine)
    hashing.set_defaults(handler=_hash_token)

    study = commands.add_parser("study", help="a grid of jobs over seeds as one table (the paper's comparisons)")
    study.add_argument("--url", default=os.environ.get("SAN_API_URL", DEFAULT_URL), help="the service's base URL")
    study.add_argument("--token-file", metavar="PATH", help="a file holding the bearer token (default: $SAN_API_TOKEN)")
    study.add_argument("--token", action=_TokenOnCommandLine)
    verbs = study.add_subparsers(dest="action", required=True, parser_class=type(study))
    for name, text in (("run", "run a study on the local Ray (or $RAY_ADDRESS), children one after another"),
                       ("submit", "submit a study to the service")):  # fmt: skip
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("spec", help="e.g. configs/studies/table4-fmnist.yaml")
        verb.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the spec's")
        verb.add_argument("--epochs", type=int, help="override base.training.epochs")
        if name == "run":
            verb.add_argument(
                "--out",
                type=Path,
                help="write the tables, figures and run.md here (default: $SAN_STORAGE_ROOT/studies/<id>)",
            )
            verb.set_defaults(handler=_study_run)
            continue
        verb.add_argument("--idempotency-key", help="a retry with the same key returns the same study")
        verb.add_argument("--wait", action="store_true", help="follow it until it ends, then print the table")
        verb.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls with --wait")
        verb.set_defaults(handler=_study_submit)
    listing = verbs.add_parser("list", help="your studies, newest first")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=_study_list)
    for name, method, suffix, text in (("show", "GET", "", "one study's progress"),
                                       ("cancel", "POST", "/cancel", "cancel every child not finished")):  # fmt: skip
        action = verbs.add_parser(name, help=text)
        action.add_argument("id")
        action.add_argument("--json", action="store_true", help="the whole study (with its table) as JSON")
        action.set_defaults(handler=_one(method, suffix, "studies", _study_line))
    watch = verbs.add_parser("watch", help="follow a study's children's state changes live, to its end")
    watch.add_argument("id")
    watch.set_defaults(handler=_watch("studies"))
    table = verbs.add_parser("table", help="the table so far")
    table.add_argument("id")
    table.add_argument("--format", choices=["md", "csv", "json"], default="md")
    table.set_defaults(handler=_study_table)
    for verb in [*actions.choices.values(), *verbs.choices.values()]:  # `san jobs list --token X` too
        verb.add_argument("--token", action=_TokenOnCommandLine)

    stack = commands.add_parser("stack", help="the deployed topology as local processes (Ray head + node, "
                                "PostgreSQL, mlflow server, API)")  # fmt: skip
    stack.add_argument("--dir", default="runs/stack", help="its storage root, MLflow artifacts, database and logs")
    verbs = stack.add_subparsers(dest="action", required=True, parser_class=type(stack))
    up = verbs.add_parser("up", help="start it and wait until the API is ready")
    for name, default in (("api", 8000), ("mlflow", 5000), ("dashboard", 8265)):
        up.add_argument(f"--{name}-port", type=int, default=default, help=f"default {default}; 0: any free port")
    up.add_argument("--timeout-s", type=float, default=180)
    for name, text in (("down", "stop exactly what `up` started, by PID"), ("status", "which parts are running")):
        verbs.add_parser(name, help=text)
    stack.set_defaults(handler=_stack)
