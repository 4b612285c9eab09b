"""fxdeco as a ``torch.compile`` backend (``backend.py``: ``fxdeco.backend``)."""
