"""zsadapt.threads: how many CPU threads torch gets (the CPUs this process may use, less those
other processes keep busy now)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from zsadapt import threads
from zsadapt.threads import CpuSample, busy_cpus, choose_threads, parse_threads, sample_cpus, set_threads

STAT = """cpu  {busy} 0 0 {idle} 0 0 0 0 0 0
cpu0 1 0 0 1 0 0 0 0 0 0
cpu1 1 0 0 1 0 0 0 0 0 0
intr 0
"""


def write_stat(path, busy: int, idle: int):
    path.write_text(STAT.format(busy=busy, idle=idle))
    return path


def test_sample_cpus_reads_busy_and_idle_ticks(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 2 100 7 3 4 5 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")
    sample = sample_cpus(stat)
    assert (sample.busy, sample.total, sample.cpus) == (10 + 1 + 2 + 3 + 4, 20 + 100 + 7, 1)  # no steal (5)


@pytest.mark.parametrize("text", [None, "", "garbage\n", "cpu  1 2 x\n", "cpu  1 2 3\n"])
def test_sample_cpus_is_none_where_the_counters_cannot_be_read(tmp_path, text):
    stat = tmp_path / "stat"
    if text is not None:
        stat.write_text(text)
    assert sample_cpus(stat) is None
    assert busy_cpus(stat=stat, min_window=0.0) == 0.0


def test_busy_cpus_is_the_machines_busy_share_less_this_process(tmp_path):
    """Between two samples one second apart the 2-CPU machine was busy 150 of 200 ticks (1.5 CPUs),
    0.5 CPU of it this process's own: the others keep 1.0 busy."""
    now, own = time.monotonic(), time.process_time()
    since = CpuSample(busy=1000, total=2000, cpus=2, own=own - 0.5, at=now - 1.0)
    stat = write_stat(tmp_path / "stat", busy=1150, idle=2000 - 1000 + 50)
    measured = busy_cpus(since=since, stat=stat)
    assert measured == pytest.approx(1.0, abs=0.05)  # the rest: CPU this test used meanwhile


def test_busy_cpus_waits_for_its_shortest_window(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_last", None)
    stat = write_stat(tmp_path / "stat", busy=10, idle=10)
    start = time.monotonic()
    busy_cpus(stat=stat, min_window=0.2)
    assert time.monotonic() - start >= 0.2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_busy_cpus_sees_a_process_spinning_on_a_core(monkeypatch):
    monkeypatch.setattr(threads, "_last", None)  # a window that starts with the spinner
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        assert busy_cpus(min_window=0.3) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("cpus, busy, machine, expected", [
    (2, 0.0, 2, 2),      # idle machine: every CPU
    (2, 1.0, 2, 1),      # one core held by another process
    (2, 5.0, 2, 1),      # overloaded: still one thread
    (4, 0.4, 4, 4),      # a little load rounds away
    (4, 8.0, 64, 4),     # a 4-CPU container on a 64-CPU host expects 8 * 4 / 64 = 0.5 of its own taken
    (4, 32.0, 64, 2),
])
def test_choose_threads(cpus, busy, machine, expected):
    assert choose_threads(cpus, busy, machine) == expected


def test_usable_cpus_follows_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cpus(tmp_path) == affinity
    assert threads.usable_cpus(tmp_path / "missing") == affinity


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), ("", None), (0, None),
                                             ("3", 3), (2, 2)])
def test_parse_threads(value, expected):
    assert parse_threads(value, "threads") == expected


@pytest.mark.parametrize("value", ["many", -1, 1.5, True])
def test_parse_threads_refuses_what_is_not_a_count(value):
    with pytest.raises(ValueError, match=r"threads: expected a number of threads \(0 or .auto.: choose\)"):
        parse_threads(value, "threads")


def test_busy_cpus_reuses_its_previous_window(tmp_path, monkeypatch):
    """A process that asks again within MAX_WINDOW seconds measures from its previous sample, and
    within min_window gets the previous answer: it waits for nothing."""
    stat = write_stat(tmp_path / "stat", busy=100, idle=100)
    monkeypatch.setattr(threads, "_last", None)
    assert busy_cpus(stat=stat, min_window=0.0) == 0.0  # one sample twice: no time between
    sample, _ = threads._last
    monkeypatch.setattr(threads, "_last", (sample._replace(at=sample.at - 1.0), 0.0))  # a second ago
    write_stat(stat, busy=300, idle=100)  # since then 200 ticks, all busy, on the 2 CPUs
    start = time.monotonic()
    assert busy_cpus(stat=stat, min_window=0.5) == pytest.approx(2.0, abs=0.1)  # less our own: ~0
    assert busy_cpus(stat=stat, min_window=60.0) == threads._last[1]  # within min_window: the answer again
    assert time.monotonic() - start < 1.0
    old = threads._last[0]._replace(at=time.monotonic() - threads.MAX_WINDOW - 1)
    monkeypatch.setattr(threads, "_last", (old, 0.0))
    start = time.monotonic()
    busy_cpus(stat=stat, min_window=0.2)  # too old: a fresh window, waited for
    assert time.monotonic() - start >= 0.2


def test_set_threads_precedence(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.ENV, "1")
        assert set_threads(None) == 1 and torch.get_num_threads() == 1  # the environment variable
        assert set_threads(2) == 2  # an explicit count wins over it
        monkeypatch.delenv(threads.ENV)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == torch.get_num_threads() == 2  # left to torch, untouched
    finally:
        torch.set_num_threads(before)
