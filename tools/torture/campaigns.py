"""The campaigns ``python -m tools.torture`` knows (import new campaign modules here)."""

from __future__ import annotations

from tools.torture import capture  # noqa: F401  (registers "capture")
from tools.torture.core import CAMPAIGNS

__all__ = ["CAMPAIGNS"]
