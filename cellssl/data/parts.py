"""Resumable outputs in parts: a long pass over a large set written a part of rows at a time.

``embed`` (features) and ``predict`` (per-cell predictions) on millions of cells keep at most one
part of rows in memory: part k holds rows ``[k * part_rows, (k + 1) * part_rows)`` of the pass and
is written as ``part-0000kk.npz`` (numpy arrays, one row each; written under a temporary name
renamed at the end, so a killed run leaves only complete parts) into a parts folder whose
``plan.json`` records what the parts depend on (model, data, rows, ``part_rows``). A rerun with
the same plan keeps the complete parts and computes the rest; a parts folder of another plan is a
one-line :class:`~cellssl.errors.DataError` naming the difference. The command assembles its
output from the parts (:meth:`Parts.arrays`, :meth:`Parts.load`: one part read at a time) and
then removes the folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellssl.data.io import output_file
from cellssl.errors import DataError

__all__ = ["Parts", "open_parts", "plan_differences", "PLAN_NAME"]

PLAN_NAME = "plan.json"


def plan_differences(old: Any, new: dict, names: Mapping[str, str] | None = None) -> list[str]:
    """How the plan on disk (``old``; None when unreadable) differs from ``new``: one entry per key
    of ``new`` whose value differs, ``"<label> <theirs> vs <ours>"`` (``names`` maps a key to its
    label, default the key), nested dicts compared key by key, e.g. ``["backbone random:resnet18 vs
    pixels:16", "rows 15 vs 12"]``. Empty when the parts are of the same plan."""
    if not isinstance(old, dict):
        return [f"an unreadable {PLAN_NAME}"]
    names = names or {}
    diff: list[str] = []
    for key, ours in new.items():
        theirs = old.get(key)
        if isinstance(ours, dict) and isinstance(theirs, dict):
            diff += plan_differences(theirs, ours, names)
        elif theirs != ours:
            diff.append(f"{names.get(key, key)} {theirs} vs {ours}")
    return diff


class Parts:
    """The parts of one pass over ``n_rows`` rows in parts of ``part_rows`` (see the module docstring).

    Attributes:
        folder: the parts folder.
        n_rows, part_rows: rows of the pass, rows per part (the last part may hold fewer).
        names: the file of each part, ``folder/part-00000k.npz``.
    """

    def __init__(self, folder: str | Path, n_rows: int, part_rows: int):
        self.folder, self.n_rows, self.part_rows = Path(folder), int(n_rows), int(part_rows)
        self.names = [self.folder / f"part-{k:06d}.npz" for k in range(-(-self.n_rows // self.part_rows))]

    def bounds(self, k: int) -> tuple[int, int]:
        """``(start, stop)``: part k holds rows ``start <= i < stop`` of the pass."""
        return k * self.part_rows, min(self.n_rows, (k + 1) * self.part_rows)

    def todo(self) -> list[int]:
        """The parts not written yet (a rerun continues with these)."""
        return [k for k, name in enumerate(self.names) if not name.is_file()]

    def save(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write part k (arrays with one row per row of the part), atomically."""
        with output_file(self.names[k]) as tmp:
            np.savez(tmp, **arrays)

    def load(self, k: int, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """The arrays of part k, but those named in ``skip`` (not read from disk)."""
        with np.load(self.names[k]) as z:
            return {key: z[key] for key in z.files if key not in skip}

    def arrays(self, key: str) -> Iterator[np.ndarray]:
        """Array ``key`` of each part in turn (one part read at a time)."""
        for name in self.names:
            with np.load(name) as z:
                yield z[key]

    def remove(self) -> None:
        """Delete the parts folder (once the output is assembled)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def open_parts(folder: str | Path, plan: dict, *, out: str | Path, what: str,
               names: Mapping[str, str] | None = None) -> Parts:
    """The :class:`Parts` of ``plan`` (which holds ``rows`` and ``part_rows``: the pass's rows, in parts of) in
    ``folder``: created with its ``plan.json``, or, when it holds parts already, checked to be of
    the same plan (:func:`plan_differences` with ``names``; else a one-line DataError naming the
    folder, the difference and the fix: delete it, or choose another ``--out`` than ``out``). Stale
    temporary files of a killed run are removed. ``what`` names the output (``"embedding"``)."""
    folder = Path(folder)
    plan_file = folder / PLAN_NAME
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = None
        diff = plan_differences(old, plan, names)
        if diff:
            raise DataError(f"{folder} holds the parts of another {what} (theirs vs this one: {'; '.join(diff)}): "
                            f"delete it, or choose another --out than {out}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".part-*.partial-*"):
        stale.unlink(missing_ok=True)
    if not plan_file.is_file():
        with output_file(plan_file) as tmp:
            tmp.write_text(json.dumps(plan, indent=1))
    return Parts(folder, int(plan["rows"]), int(plan["part_rows"]))
