"""The campaigns ``python -m tools.torture`` knows (import new campaign modules here)."""

from __future__ import annotations

from tools.torture import capture, catalog_damage, restore, stream_fuzz  # noqa: F401  (they register themselves)
from tools.torture.core import CAMPAIGNS

__all__ = ["CAMPAIGNS"]
