"""falor: its config (``Falor``). The local, budget and final-output modes run in ``fxdeco.falor`` and
``fxdeco.falor_final`` (to move here with the layout step of the architecture work)."""

from fxdeco.methods.falor.config import MODE_OPTIONS, Falor

__all__ = ["MODE_OPTIONS", "Falor"]
