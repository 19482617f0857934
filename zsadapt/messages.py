"""Notes and progress for the user on stderr, silenced by ``set_quiet(True)`` or ``--quiet``.

Results go to stdout (CLI) or return values (API); everything a person should know about *how*
the inputs were treated (normalised, transposed, upcast) goes through :func:`note`, and how far a
long loop has got through :func:`progress`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Hashable, Optional

_quiet = False

#: Seconds a loop runs before its first progress line (a shorter stage stays silent).
PROGRESS_DELAY = 2.0

#: Seconds between progress lines when stderr is not a terminal (a log file, a pipe, CI).
LOG_INTERVAL = 5.0

#: Seconds between ``\r`` redraws of the progress line on a terminal.
TTY_INTERVAL = 0.25


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or restore (``False``) the notes printed by :func:`note`."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): one-line errors
    that quote a library's error."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def note(message: str) -> None:
    """Print ``zsadapt: message`` on stderr unless notes are silenced (ends a :func:`heartbeat`)."""
    if not _quiet:
        stop_heartbeat()
        print(f"zsadapt: {message}", file=sys.stderr, flush=True)


#: Messages :func:`note_once` has printed in this process.
_shown_once: set = set()


def note_once(message: str, key: Optional[Hashable] = None) -> None:
    """:func:`note` the first time this process prints a note of ``key`` (default: the message):
    for what a note says about the inputs (a square text array, classes with identical
    embeddings), which reading the pool and every method run on it would repeat (``zsadapt
    compare``, a notebook's loop over methods), each naming the array its own way."""
    key = message if key is None else key
    if not _quiet and key not in _shown_once:
        _shown_once.add(key)
        note(message)


class Heartbeat:
    """``zsadapt: desc (elapsed s)`` on stderr while nothing else is shown, from a daemon thread.

    For the stretch before a command's first note, which has no loop to count: importing torch,
    scikit-learn and the solvers, reading the inputs (about 7 s on an idle machine, 15-20 s on a
    busy one). Nothing is written during the first ``delay`` seconds; after that the line is
    redrawn in place on a terminal every :data:`TTY_INTERVAL` seconds, or printed every
    :data:`LOG_INTERVAL` seconds elsewhere. It stops for good at :meth:`stop`, which :func:`note`
    and the first line of a :class:`Progress` call (so it never interleaves with them).
    """

    def __init__(self, desc: str, *, delay: Optional[float] = None, interval: Optional[float] = None,
                 start: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.desc = desc
        self.interval = interval
        self.clock = clock
        self.start = clock() if start is None else start  # elapsed seconds count from here
        # The first line comes ``delay`` seconds after the start (at once if that has passed).
        self.delay = max(0.0, (PROGRESS_DELAY if delay is None else float(delay)) - (clock() - self.start))
        self.shown = False
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # a line is written whole, and never after stop()
        self._thread = threading.Thread(target=self._run, name="zsadapt-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.delay
        while not self._stopped.wait(wait):
            tty = Progress._tty()
            with self._lock:
                if self._stopped.is_set():
                    return
                line = f"zsadapt: {self.desc} ({self.clock() - self.start:.0f} s)"
                sys.stderr.write(("\r" + line) if tty else (line + "\n"))
                sys.stderr.flush()
                self.shown = True
            wait = self.interval if self.interval is not None else (TTY_INTERVAL if tty else LOG_INTERVAL)

    def stop(self) -> None:
        """Stop the thread; on a terminal, end the line it was redrawing."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            if self.shown and Progress._tty():
                sys.stderr.write("\n")
                sys.stderr.flush()


_heartbeat: Optional[Heartbeat] = None


def heartbeat(desc: str, *, delay: Optional[float] = None, interval: Optional[float] = None,
              start: Optional[float] = None) -> None:
    """Start the :class:`Heartbeat` ``desc`` (replacing a running one), unless notes are silenced;
    :func:`stop_heartbeat`, :func:`note` or a :class:`Progress` line ends it. ``start``: the
    ``time.monotonic()`` its elapsed seconds count from (default: now)."""
    global _heartbeat
    stop_heartbeat()
    if not _quiet:
        _heartbeat = Heartbeat(desc, delay=delay, interval=interval, start=start)


def stop_heartbeat() -> None:
    """End the running :func:`heartbeat`, if any (cheap when there is none)."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


class Progress:
    """Progress of one loop on stderr, throttled so that a fast loop costs nothing.

    Nothing is written during the first ``delay`` seconds, so a short stage stays silent; after
    that, on a terminal the line ``zsadapt: desc: done/total detail (elapsed s)`` is redrawn in
    place (``\\r``) every ``interval`` seconds (:data:`TTY_INTERVAL`), and elsewhere (a log, a
    pipe) one such line is printed every :data:`LOG_INTERVAL` seconds. :meth:`close` ends the line
    (terminal) or prints the final count (log), only if something was shown. Silent when ``show``
    is false or notes are silenced (:func:`set_quiet`, ``--quiet``).

    Parameters
    ----------
    total : int
        Number of steps the loop runs at most (an early stop ends before it).
    desc : str
        What is running, e.g. ``"inmap: gradient steps"``.
    show : bool
        Whether progress may be shown at all (a solver passes ``problem.progress``).
    delay, interval : float, optional
        Seconds before the first line (:data:`PROGRESS_DELAY`) and between lines (default:
        :data:`TTY_INTERVAL` on a terminal, :data:`LOG_INTERVAL` otherwise).
    clock : callable
        Returns seconds (``time.monotonic``).
    eta : bool
        Add the time left at the rate so far (``about 4 min left``): for loops that run all
        ``total`` steps (rows to label), not for those an early stop may end (iterations).
    unit : str, optional
        What a step is (``"rows"``): the line then shows the rate so far, ``(59,209 rows/s)``.
    """

    def __init__(self, total: int, desc: str, *, show: bool = True, delay: Optional[float] = None,
                 interval: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 eta: bool = False, unit: Optional[str] = None) -> None:
        self.total = int(total)
        self.desc = desc
        self.show = bool(show)
        self.clock = clock
        self.start = clock()
        self.delay = PROGRESS_DELAY if delay is None else float(delay)
        self.interval = interval
        self.eta = bool(eta)
        self.unit = unit
        self.done = 0
        self.detail = ""
        self._last: Optional[float] = None  # when a line was last written
        self._width = 0  # length of the line on the terminal, to blank it on redraw
        self._shown = -1  # the count last written

    @staticmethod
    def _tty() -> bool:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())

    def _line(self) -> str:
        elapsed = self.clock() - self.start
        detail = f" {self.detail}" if self.detail else ""
        if self.unit:
            rate = self.done / max(elapsed, 1e-9)
            detail = f" ({rate:,.0f} {self.unit}/s)" if rate >= 100 else f" ({rate:.1f} {self.unit}/s)"
            detail += f" {self.detail}" if self.detail else ""
        left = ""
        if self.eta and 0 < self.done < self.total and elapsed > 0:
            left = f", about {duration(elapsed * (self.total - self.done) / self.done)} left"
        return f"zsadapt: {self.desc}: {self.done}/{self.total}{detail} ({duration(elapsed)}{left})"

    def _write(self, final: bool) -> None:
        stop_heartbeat()
        line = self._line()
        if self._tty():
            sys.stderr.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last = self.clock()
        self._shown = self.done

    def update(self, done: int, detail: str = "") -> None:
        """Record that ``done`` steps are complete (``detail``: e.g. the quantity a stopping rule
        watches) and write the line when it is due."""
        self.done, self.detail = int(done), detail
        if not self.show or _quiet:
            return
        now = self.clock()
        if self._last is None:
            due = now - self.start >= self.delay
        else:
            interval = self.interval if self.interval is not None else (
                TTY_INTERVAL if self._tty() else LOG_INTERVAL)
            due = now - self._last >= interval
        if due:
            self._write(final=False)

    def close(self) -> None:
        """End the progress display (the terminal line ends; a log gets the final count unless its
        last line showed it), if anything was shown."""
        if self.show and not _quiet and self._last is not None and (self._tty() or self._shown != self.done):
            self._write(final=True)
        self._last = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``: a time span as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress(total: int, desc: str, *, show: bool = True, delay: Optional[float] = None,
             interval: Optional[float] = None, eta: bool = False, unit: Optional[str] = None) -> Progress:
    """A :class:`Progress` for a loop of ``total`` steps::

        with progress(max_iter, "em: iterations", show=problem.progress) as bar:
            for i in range(1, max_iter + 1):
                ...
                bar.update(i, f"change {change:.1e}")
    """
    return Progress(total, desc, show=show, delay=delay, interval=interval, eta=eta, unit=unit)
