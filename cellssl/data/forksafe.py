"""OpenCV's thread pool and ``fork``: a forked process (a DataLoader worker) never inherits a live pool.

OpenCV's pthreads pool is not fork-safe: once the parent has run a parallel OpenCV call (a
``cv2.GaussianBlur`` or ``cv2.resize`` of a view preview, an augmentation in the main process), a
thread-pool call in a forked child (``cv2.setNumThreads``) can block forever on a lock that a
parent thread held at the fork. :func:`register_opencv_fork_hooks` (run when ``cellssl.data`` is
imported) makes every ``os.fork`` of the process — ``multiprocessing``'s fork start method, hence
every DataLoader worker — safe: just before the fork the parent sets OpenCV to one thread (which
stops its pool threads), right after it the parent gets its thread count back. The child starts
with no pool and OpenCV at one thread, so it runs OpenCV serially (one thread per worker, as
torch does) and needs no thread-pool call of its own.
"""

from __future__ import annotations

import os

import cv2

_state = {"registered": False, "threads": 1}


def _stop_pool_before_fork() -> None:
    """In the parent, before ``fork``: remember OpenCV's thread count and stop its pool."""
    _state["threads"] = cv2.getNumThreads()
    if _state["threads"] != 1:
        cv2.setNumThreads(1)


def _restore_pool_in_parent() -> None:
    """In the parent, after ``fork``: OpenCV's thread count as it was (the pool restarts when next used)."""
    if _state["threads"] != 1:
        cv2.setNumThreads(_state["threads"])


def register_opencv_fork_hooks() -> None:
    """Register the two ``os.register_at_fork`` hooks once per process (idempotent)."""
    if _state["registered"]:
        return
    os.register_at_fork(before=_stop_pool_before_fork, after_in_parent=_restore_pool_in_parent)
    _state["registered"] = True
