"""A job's log as the service's live events read it (``GET /v1/jobs/{id}/events``): every line the driver prints — its
own and its workers', which Ray forwards to it — appended to ``log.txt`` beside the job's spec and report, on the
storage both share. Appended and never rewritten, so a reader's byte offset stays valid: a job resumed after a Ray
head loss goes on in the same file. Ray keeps its own copy of the driver's log (``san jobs logs``); this one is the
one that outlives the head."""

import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_FILE = "log.txt"
MAX_READ_BYTES = 64 * 1024  # what one read returns at most: a stream's cost per poll is bounded, not the log's size
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "(RayTrainWorker pid=…)" prefixes


def log_path(spec_path: Path) -> Path:
    return Path(spec_path).with_name(LOG_FILE)


class _Copy:
    """``stream`` as it was, each complete line also appended to ``file`` (whole lines only: ``print`` writes the
    text and its newline separately, and Ray's log thread prints beside the main thread)."""

    def __init__(self, stream: TextIO, file: TextIO, lock: threading.Lock) -> None:
        self.stream, self.file, self.lock = stream, file, lock
        self.pending: dict[int, str] = {}

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        thread = threading.get_ident()
        *lines, rest = (self.pending.pop(thread, "") + text).split("\n")
        if rest:
            self.pending[thread] = rest
        if lines:
            with self.lock:
                self.file.write("".join(_ANSI.sub("", line) + "\n" for line in lines))
                self.file.flush()
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


@contextmanager
def copied_output(path: Path) -> Iterator[None]:
    """Inside this block, what this process prints to stdout and stderr is also appended to ``path``."""
    lock = threading.Lock()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", errors="replace") as file:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Copy(out, file, lock), _Copy(err, file, lock)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def read_lines(path: Path, offset: int, limit: int = MAX_READ_BYTES) -> list[tuple[str, int]]:
    """The complete lines of the log at ``path`` from byte ``offset`` on, each with the offset after it, reading at
    most ``limit`` bytes (a line longer than that comes cut, so a reader always moves on); [] when there are none
    (yet) or no log."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            chunk = file.read(limit)
    except OSError:
        return []
    end = chunk.rfind(b"\n") + 1
    if end == 0:
        if len(chunk) < limit:
            return []  # a line still being written
        end = len(chunk)
    lines, position = [], offset
    for raw in chunk[:end].splitlines(keepends=True):
        position += len(raw)
        lines.append((raw.rstrip(b"\r\n").decode(errors="replace"), position))
    return lines
