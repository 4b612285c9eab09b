"""dwain: loss-aware ranks, layer by layer from the last (``fxdeco.Dwain``; the algorithm in :mod:`.search`)."""

from fxdeco.methods.dwain.config import Dwain

__all__ = ["Dwain"]
