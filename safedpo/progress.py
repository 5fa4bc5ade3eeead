"""Progress reporting that stays readable both on a terminal and in a batch job's log file.

On a terminal it is a tqdm bar. When stderr is not a terminal (a Slurm log, ``make train > log``), a bar
redrawn with carriage returns turns into one enormous line, so instead a plain line is written every
``every_s`` seconds (``SAFEDPO_PROGRESS_EVERY_S``, default 30) and once at the end:

    safedpo: 140/280 (50%), 25 s elapsed, ~25 s left, loss=0.1234 acc=0.97
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional


def _every_s() -> float:
    text = os.environ.get("SAFEDPO_PROGRESS_EVERY_S", "").strip()
    if not text:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"SAFEDPO_PROGRESS_EVERY_S must be a number of seconds >= 0, got {text!r}")
    return value


class Progress:
    """``update(n)``, ``set_postfix(**values)``, ``close()``; a context manager; ``disable`` silences it."""

    def __init__(self, total: int, desc: str, initial: int = 0, disable: bool = False, stream=None):
        self.total, self.desc, self.n = total, desc, initial
        self.stream = stream or sys.stderr
        self.disable = disable
        self.postfix = ""
        self.bar = None
        self.start = self.last = time.perf_counter()
        self.initial = initial
        if disable:
            return
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)
        else:
            self.every_s = _every_s()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        elapsed = now - self.start
        done = self.n - self.initial
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", ~{elapsed / done * (self.total - self.n):.0f} s left" if done and self.total and self.n < self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total}{pct}, {elapsed:.0f} s elapsed{left}{tail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.disable:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()
        self.disable = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, disable: bool = False):
    """Iterate with a ``Progress`` report."""
    items = list(iterable) if total is None and not hasattr(iterable, "__len__") else iterable
    with Progress(total if total is not None else len(items), desc, disable=disable) as bar:
        for item in items:
            yield item
            bar.update(1)
