"""Notes, loop progress and the start-up heartbeat on stderr (issue 13 item 7): what is shown,
when, and that ``--quiet`` / ``set_quiet`` silences all of it."""

from __future__ import annotations

import time

import pytest

from zsadapt import messages


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Captured:
    """What has reached stderr so far (pytest's capture, which is not a terminal: ``\\n`` lines
    at the log interval)."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys):
    messages.set_quiet(False)
    yield Captured(capsys)
    messages.stop_heartbeat()


def test_progress_waits_then_prints_a_line_per_log_interval(stderr):
    clock = Clock()
    bar = messages.Progress(10, "em: iterations", delay=2.0, clock=clock)
    bar.update(1)
    clock.now += 1.9
    bar.update(2)
    assert stderr.getvalue() == ""  # a short stage stays silent
    clock.now += 0.2
    bar.update(3, "change 1.0e-02")
    assert stderr.getvalue() == "zsadapt: em: iterations: 3/10 change 1.0e-02 (2 s)\n"
    clock.now += messages.LOG_INTERVAL - 0.1
    bar.update(4)
    assert stderr.getvalue().count("\n") == 1
    clock.now += 0.2
    bar.update(5)
    assert stderr.getvalue().splitlines()[-1].startswith("zsadapt: em: iterations: 5/10")
    bar.update(6)
    bar.close()  # the final count, once
    assert stderr.getvalue().splitlines()[-1].startswith("zsadapt: em: iterations: 6/10")
    assert stderr.getvalue().count("\n") == 3


def test_progress_with_eta_says_the_time_left_at_the_rate_so_far(stderr):
    clock = Clock()
    bar = messages.Progress(1000, "label: rows", delay=0.0, clock=clock, eta=True)
    clock.now += 10
    bar.update(250)  # 25 rows/s: 750 rows left take 30 s
    clock.now += messages.LOG_INTERVAL  # 500 rows at +10 + interval s
    bar.update(500)
    bar.update(1000)
    bar.close()
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "zsadapt: label: rows: 250/1000 (10 s, about 30 s left)"
    elapsed = 10 + messages.LOG_INTERVAL
    assert lines[1] == f"zsadapt: label: rows: 500/1000 ({messages.duration(elapsed)}, about " \
                       f"{messages.duration(elapsed)} left)"
    assert lines[-1].endswith("1000/1000 ({})".format(messages.duration(elapsed)))  # done: nothing left to say
    plain = messages.Progress(10, "em: iterations", delay=0.0, clock=clock)  # an early stop may end it
    clock.now += 5
    plain.update(5)
    assert stderr.getvalue().splitlines()[-1] == "zsadapt: em: iterations: 5/10 (5 s)"


def test_progress_with_a_unit_shows_the_rate_so_far(stderr):
    clock = Clock()
    slow = messages.Progress(100, "encode: images", delay=0.0, clock=clock, unit="images")
    clock.now += 8
    slow.update(10, "(a detail)")  # 1.25 images/s: a decimal, then the caller's detail
    fast = messages.Progress(10 ** 6, "label: rows", delay=0.0, clock=clock, unit="rows")
    clock.now += 2
    fast.update(123_456)
    lines = stderr.getvalue().splitlines()
    assert lines == ["zsadapt: encode: images: 10/100 (1.2 images/s) (a detail) (8 s)",
                     "zsadapt: label: rows: 123456/1000000 (61,728 rows/s) (2 s)"]


@pytest.mark.parametrize("seconds, shown", [(0.4, "0 s"), (42, "42 s"), (89, "89 s"), (90, "2 min"),
                                            (12 * 60, "12 min"), (89 * 60, "89 min"), (90 * 60, "1.5 h"),
                                            (3.5 * 3600, "3.5 h")])
def test_duration_reads_as_a_person_says_it(seconds, shown):
    assert messages.duration(seconds) == shown


def test_progress_is_silent_when_quiet_or_not_shown(stderr):
    clock = Clock()
    for show, quiet in ((False, False), (True, True)):
        messages.set_quiet(quiet)
        bar = messages.Progress(3, "loop", show=show, delay=0.0, clock=clock)
        clock.now += 10
        bar.update(1)
        bar.close()
    messages.set_quiet(False)
    assert stderr.getvalue() == ""


def wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_heartbeat_shows_until_the_first_note_and_never_after(stderr):
    messages.heartbeat("refine: starting", delay=0.0, interval=0.01)
    assert wait_for(lambda: stderr.getvalue().count("\n") >= 2)
    assert stderr.getvalue().splitlines()[0].startswith("zsadapt: refine: starting (")
    messages.note("gmm: 1635 images")
    shown = stderr.getvalue()
    assert shown.endswith("zsadapt: gmm: 1635 images\n")
    time.sleep(0.1)  # ten intervals: a live thread would have written again
    assert stderr.getvalue() == shown


def test_heartbeat_stops_at_a_progress_line_and_when_stopped(stderr):
    messages.heartbeat("starting", delay=0.0, interval=0.01)
    assert wait_for(lambda: "starting" in stderr.getvalue())
    bar = messages.Progress(2, "loop", delay=0.0)
    bar.update(1)
    shown = stderr.getvalue()
    assert shown.endswith("zsadapt: loop: 1/2 (0 s)\n")
    time.sleep(0.1)
    assert stderr.getvalue() == shown
    messages.heartbeat("again", delay=0.0, interval=0.01)
    assert wait_for(lambda: "again" in stderr.getvalue())
    messages.stop_heartbeat()
    shown = stderr.getvalue()
    time.sleep(0.1)
    assert stderr.getvalue() == shown


def test_heartbeat_is_silent_before_its_delay_and_when_quiet(stderr):
    messages.heartbeat("slow", delay=60.0)
    time.sleep(0.05)
    messages.stop_heartbeat()
    messages.set_quiet(True)
    messages.heartbeat("quiet", delay=0.0, interval=0.01)
    time.sleep(0.05)
    messages.set_quiet(False)
    messages.stop_heartbeat()
    assert stderr.getvalue() == ""
