"""The one CSV and markdown writer of the benchmark scripts (bench.suite, bench.gpu_bench)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence


def write_csv(path: Path | str, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """One row per dict; keys outside ``fields`` are left out, missing ones are empty."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table; a row shorter than ``columns`` is padded with empty cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(c) for c in row] + [""] * (len(columns) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
