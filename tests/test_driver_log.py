"""A job's log (`training.driver_log`): what the driver prints, whole lines, appended; read back from a byte offset
in bounded pieces, each line once."""

import sys
import threading

from training.driver_log import copied_output, read_lines


def test_printed_lines_are_appended_whole_from_every_thread_and_without_colours(tmp_path):
    path = tmp_path / "jobs" / "j1" / "log.txt"
    path.parent.mkdir(parents=True)
    path.write_text("an earlier attempt's line\n")

    def worker(name: str) -> None:
        for index in range(200):
            print(f"\x1b[36m({name} pid=1)\x1b[0m", "line", index)  # print writes the text, then the newline

    with copied_output(path):
        threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("to stderr", file=sys.stderr)
        print("no newline yet", end="")
    lines = path.read_text().splitlines()
    assert lines[0] == "an earlier attempt's line" and lines[-1] == "to stderr"
    for name in ("a", "b"):
        assert [line for line in lines if line.startswith(f"({name} ")] == [
            f"({name} pid=1) line {index}" for index in range(200)
        ]
    assert len(lines) == 402  # the unfinished line is not written


def test_reads_resume_at_the_offset_and_never_cut_a_line_that_fits(tmp_path):
    path = tmp_path / "log.txt"
    assert read_lines(path, 0) == []  # no log yet
    path.write_bytes(b"one\ntwo\nthr")
    first = read_lines(path, 0)
    assert first == [("one", 4), ("two", 8)]
    assert read_lines(path, 8) == []  # "thr" is still being written
    with open(path, "ab") as file:
        file.write(b"ee\n" + b"x" * 50 + b"\nfive\n")
    assert read_lines(path, 8, limit=20) == [("three", 14)]  # the next line does not fit: the next read has it
    assert read_lines(path, 14, limit=20) == [("x" * 20, 34)]  # a line longer than a read comes cut, never stuck
    assert [line for line, _ in read_lines(path, 34)] == ["x" * 30, "five"]
    assert read_lines(path, path.stat().st_size) == []
