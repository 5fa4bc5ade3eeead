"""Progress reports of long work (training, reference log-probs, SFT) stay readable in log files."""

import io

import pytest


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    """Not a terminal: one line per interval and one at the end, no carriage returns."""
    from safedpo.progress import Progress

    monkeypatch.setenv("SAFEDPO_PROGRESS_EVERY_S", "0")
    log = io.StringIO()
    with Progress(4, "train", stream=log) as bar:
        for step in range(4):
            bar.update(1)
            bar.set_postfix(loss=f"{1.0 / (step + 1):.2f}")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("train: 1/4 (25%)") and "left" in lines[0]
    assert lines[-1].startswith("train: 4/4 (100%)") and lines[-1].endswith("loss=0.25")
    monkeypatch.setenv("SAFEDPO_PROGRESS_EVERY_S", "soon")
    with pytest.raises(ValueError, match="SAFEDPO_PROGRESS_EVERY_S"):
        Progress(4, "train", stream=io.StringIO())
