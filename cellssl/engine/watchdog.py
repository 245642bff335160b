"""A training run never hangs silently, and a stop signal never loses its steps.

- :class:`StallWatchdog`: a daemon thread that watches the stage the loop is in (``"waiting for a
  batch"``, ``"forward"``, ...). When one stage lasts longer than ``train.stall_timeout_s`` it
  writes a ``faulthandler`` stack dump of every thread of the main process (and, through
  ``SIGUSR1``, of each data-loader worker) to ``OUT/stall-step<N>.txt`` and interrupts the main
  thread (a SIGINT sent to it), which stops with a one-line error naming the stage and the dump. A main thread that
  does not answer within a grace period (stuck in C code) is ended by the watchdog with the
  same line on stderr.
- :func:`deferred_stop_signals`: SIGINT (Ctrl-C) and SIGTERM (schedulers, ``docker stop``) only
  set a flag while the loop runs, so it stops at the end of the current step and writes a
  checkpoint of exactly that step; a second signal interrupts at once. The first one is
  acknowledged at once on stderr (:func:`stop_notice`): a step can take minutes (the first one
  compiles), and a run that says nothing after Ctrl-C looks hung.
- :func:`register_worker_stack_dump`: what a data-loader worker runs at start (no thread-pool call).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

STOP_SIGNALS = {signal.SIGINT: ("SIGINT", "interrupted", 130), signal.SIGTERM: ("SIGTERM", "terminated", 143)}


def exit_code_for(stopped_early: str | None) -> int | None:
    """The exit code of a run stopped by a signal (130 for ``"interrupted"``, 143 for ``"terminated"``)."""
    return {why: code for _, why, code in STOP_SIGNALS.values()}.get(stopped_early or "")


class StopRequest:
    """What :func:`deferred_stop_signals` saw: ``signal`` (``"SIGINT"``/``"SIGTERM"``) and ``reason``
    (``"interrupted"``/``"terminated"``), None until a signal came."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.reason: str | None = None


def stop_notice(name: str) -> bytes:
    """The line written to stderr when a stop signal ``name`` (``"SIGTERM"``) is first received."""
    return (f"\n{name} received: stopping at the end of this step and writing a checkpoint "
            f"(send it again to stop now)\n").encode()


@contextlib.contextmanager
def deferred_stop_signals(interrupt_now: Callable[[], bool] = lambda: False) -> Iterator[StopRequest]:
    """While the block runs, the first SIGINT or SIGTERM only fills the yielded :class:`StopRequest`
    (and writes :func:`stop_notice` to stderr); a second one (or any signal once ``interrupt_now()``
    is true: a stall) raises KeyboardInterrupt at once. Torch's SIGCHLD handler is set aside after a
    stop request, so workers ended by the same signal do not interrupt the step in progress. Outside
    the main thread nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    set_aside: list = []  # torch's SIGCHLD handler, once set aside

    def on_signal(signum, _frame) -> None:
        if request.signal is not None or interrupt_now():
            raise KeyboardInterrupt
        request.signal, request.reason, _ = STOP_SIGNALS[signal.Signals(signum)]
        with contextlib.suppress(OSError):  # os.write, not print: a handler may run inside a print
            os.write(sys.stderr.fileno(), stop_notice(request.signal))
        set_aside.append(signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        if set_aside:
            previous[signal.SIGCHLD] = set_aside[0]
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def register_worker_stack_dump(stack_fd: int | None) -> None:
    """In a data-loader worker: ignore SIGINT (a Ctrl-C of the process group stops the main process,
    which then shuts the workers down) and dump every thread's stack to ``stack_fd`` on SIGUSR1
    (``faulthandler``, which works even in a worker stuck in C code)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stack_fd is not None:
        faulthandler.register(signal.SIGUSR1, file=stack_fd, all_threads=True)


class StallWatchdog:
    """Stops a run whose current stage lasts longer than ``timeout_s`` (0 = off); see the module docstring.

    ``stage(name, factor)`` marks the start of a stage (its limit is ``factor × timeout_s``);
    ``fired`` is the stalled stage's ``(name, seconds)`` once it fired, ``dump_path`` the dump.
    ``worker_pids()`` lists the data-loader workers, whose stacks (written by
    :func:`register_worker_stack_dump` to ``worker_stacks``, an unnamed temporary file) are copied
    into the dump.
    """

    def __init__(self, timeout_s: float, dump_dir: Path, worker_pids: Callable[[], list[int]] = list,
                 worker_stacks=None, grace_s: float = 30.0) -> None:
        self.timeout_s, self.dump_dir, self.worker_pids = float(timeout_s or 0), Path(dump_dir), worker_pids
        self.worker_stacks, self.grace_s = worker_stacks, grace_s
        self.name, self.factor, self.since, self.step = "starting", 1.0, time.monotonic(), 0
        self.fired: tuple[str, float] | None = None
        self.dump_path: Path | None = None
        self.last_line = ""
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = threading.main_thread()

    def stage(self, name: str, step: int, factor: float = 1.0) -> None:
        """The loop enters stage ``name`` of (0-based) ``step``."""
        if self.fired is not None:  # fired while the loop ran outside the main thread (no signal reaches it)
            raise KeyboardInterrupt
        self.name, self.step, self.factor, self.since = name, step, factor, time.monotonic()

    def __enter__(self) -> StallWatchdog:
        self._owner = threading.current_thread()
        if self.timeout_s > 0:
            self.since = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="cellssl-stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 4)
        while not self._done.wait(tick):
            waited = time.monotonic() - self.since
            if waited <= self.timeout_s * self.factor:
                continue
            self.fired = (self.name, waited)
            self.dump(f"no progress for {waited:.0f} s in stage '{self.name}' of step {self.step + 1}")
            if self._owner is threading.main_thread():  # a real SIGINT: it also ends a blocking wait (EINTR)
                signal.pthread_kill(self._owner.ident, signal.SIGINT)
            if not self._done.wait(self.grace_s):  # the main thread did not answer: stuck in C code
                sys.stderr.write(f"error: {self.message()} (the process did not answer; ended)\n")
                sys.stderr.flush()
                os._exit(1)
            return

    def dump(self, header: str) -> Path:
        """Write the stacks of every thread (main process, then each worker) to ``stall-step<N>.txt``."""
        self.dump_path = self.dump_dir / f"stall-step{self.step + 1}.txt"
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        pids = list(self.worker_pids())
        if self.worker_stacks is not None:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)  # the workers' faulthandler writes at once, from its signal handler
        with open(self.dump_path, "w") as f:
            f.write(f"{header}\n\n== main process {os.getpid()} ==\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            if self.worker_stacks is not None and pids:
                self.worker_stacks.seek(0)
                f.write(f"\n== data-loader workers {', '.join(map(str, pids))} ==\n")
                f.write(self.worker_stacks.read().decode(errors="replace"))
        return self.dump_path

    def message(self) -> str:
        """The one-line error of a stall."""
        name, waited = self.fired or (self.name, time.monotonic() - self.since)
        return (f"training stalled: no progress for {waited:.0f} s in stage '{name}' of step {self.step + 1} "
                f"(train.stall_timeout_s={self.timeout_s:g}); stack dump of all threads: {self.dump_path}")


class RunStopped(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint: ``message`` says where and how
    to go on, ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM). Raised by commands that return a path
    (``adapt``), so that a stopped run is never taken for a finished one."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def stopped_message(stopped_early: str, step: int, total_steps: int, checkpoint: Path) -> str:
    """``"interrupted (SIGINT) at step 24 of 100: checkpoint RUN/checkpoints/last.pt (step 24); continue
    with --resume"``."""
    sig = {why: name for name, why, _ in STOP_SIGNALS.values()}.get(stopped_early, stopped_early)
    return (f"{stopped_early} ({sig}) at step {step} of {total_steps}: checkpoint {checkpoint} (step {step}); "
            "continue with --resume")
