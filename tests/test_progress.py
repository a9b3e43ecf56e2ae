"""runtime/progress.py and runtime/logs.py: long work says how far it is, as lines where there is no terminal."""
import logging

from runtime import logs
from runtime.progress import Progress


def test_progress_says_a_line_at_each_tenth_and_at_the_end(capsys):
    for _ in Progress("sim", 25, unit="patient").iterate(range(25)):
        pass
    lines = capsys.readouterr().err.splitlines()
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    assert all(line.startswith("sim: ") and "/25 patients (" in line for line in lines)


def test_progress_update_jumps_and_disabled_says_nothing(capsys):
    p = Progress("calibrate unet", 300, unit="frame", indent="  ")
    p.update(150)
    p.update(151)                         # within the same tenth: no new line
    p.update(300)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "  calibrate unet: 150/300 frames", "  calibrate unet: 300/300 frames"]
    q = Progress("quiet", 10, enabled=False)
    for _ in q.iterate(range(10)):
        pass
    bar_only = Progress("epoch", 10, lines=False)          # no terminal here: no bar, and no lines either
    for _ in bar_only.iterate(range(10)):
        pass
    assert capsys.readouterr().err == ""


def test_log_lines_go_to_the_stderr_of_the_moment_once_even_when_the_root_logger_has_a_handler(capsys):
    """A library that calls logging.basicConfig (some do while training) gives the root logger a handler: sonoscore's
    lines still appear once."""
    import sys
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        logs.get("bench").info("one line")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == "one line\n"
