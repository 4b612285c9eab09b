"""Repository-wide pytest set-up (the doctests of fxdeco/ and passes/ are collected from here too)."""

from __future__ import annotations

import tempfile

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_temporary_files(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Doctests write with ``tempfile.mkdtemp()`` (the example a reader copies): under pytest those folders go
    into the test's own ``tmp_path``, which pytest removes, instead of piling up in the system's temp dir."""
    if isinstance(request.node, DoctestItem):
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
