"""falor: its config (``config.py``, ``fxdeco.Falor``), local and budget mode (``local.py``), the budget's
knapsack and measured round (``budget.py``, ``budget_measure.py``), final-output mode (``final.py``,
``final_metrics.py``) and the rank maths they share (``lowrank.py``)."""

from fxdeco.methods.falor.config import MODE_OPTIONS, Falor

__all__ = ["MODE_OPTIONS", "Falor"]
