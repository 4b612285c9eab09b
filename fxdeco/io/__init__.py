"""What a decomposition leaves behind: the report (``report.py``), saved plans and weights (``serialize.py``:
``fxdeco.save`` / ``fxdeco.load``) and graph drawings (``dump.py``: ``fxdeco.dump``)."""
