"""The (major, minor) release of an installed package, for the trainer's version floors."""

from __future__ import annotations

from typing import Optional

import torch
from packaging.version import Version


def major_minor(version: Optional[str] = None) -> tuple:
    """(major, minor) of a version string such as "2.11.0+cu130" or "5.17.0rc1" (default: the running
    torch's)."""
    release = Version(version or torch.__version__).release
    return (release + (0,))[:2]
