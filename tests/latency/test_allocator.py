"""The C allocator's page faults: counted per call, estimated as a share of the time, and held off on glibc."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest
import torch

from fxdeco.latency import allocator

resource = pytest.importorskip("resource")  # page faults are counted on Unix only

PAGES = 2048


def _touch_fresh_pages() -> None:
    # an anonymous mapping is fresh memory from the OS: writing one byte per page faults each page in
    with mmap.mmap(-1, PAGES * mmap.PAGESIZE) as m:
        for i in range(0, PAGES * mmap.PAGESIZE, mmap.PAGESIZE):
            m[i] = 1


def test_page_faults_counts_the_fresh_pages_a_call_touches() -> None:
    assert allocator.page_faults(_touch_fresh_pages) >= PAGES
    assert allocator.page_faults(lambda: sum(range(100))) < PAGES / 10


def test_the_fault_share_and_the_advice_name_the_cost_and_the_remedy() -> None:
    assert allocator.fault_share(0, 0.01) == 0.0 and allocator.fault_share(1e9, 0.01) == 1.0
    advice = allocator.fault_advice(25_000, 0.061)
    assert "25,000 times" in advice and "98 MiB" in advice and "45%" in advice
    assert "hold_freed_memory()" in advice and "jemalloc" in advice


# A tensor of 64 MiB is over glibc's largest adaptive mmap threshold (32 MiB): by default every allocation of it is
# fresh memory from the OS, faulted in page by page; once freed memory is held, later allocations reuse it.
_SCRIPT = """
import sys, torch
from fxdeco.latency import allocator
held = allocator.hold_freed_memory() if sys.argv[1] == "hold" else None
for _ in range(6):  # the first allocations fault their pages in either way (the held heap grows to its peak)
    torch.ones(16 * 2**20)
print(held, allocator.page_faults(lambda: torch.ones(16 * 2**20), calls=3))
"""


def _faults_in_fresh_process(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's mallopt only")
def test_holding_freed_memory_stops_large_tensors_faulting_on_every_allocation() -> None:
    _, default = _faults_in_fresh_process("default")
    held, holding = _faults_in_fresh_process("hold")
    assert default >= 16 * 2**20 * 4 / 4096 * 0.9  # every page of the 64 MiB, every time
    assert held == "True" and holding < default / 100


def test_a_layer_timed_under_another_allocator_setting_has_another_cache_key(monkeypatch) -> None:
    from fxdeco.latency import LatencyKey

    monkeypatch.setattr(allocator, "_preloaded_allocator", lambda: "")
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_held", False)

    def key() -> LatencyKey:
        return LatencyKey.here("cpu", torch.float32, "eager", kind="linear", weight_shape=(8, 8), input_shape=(4, 8))

    default = key()
    assert "malloc" not in default.device  # the defaults keep the keys of tables measured before this field
    monkeypatch.setattr(allocator, "_held", True)
    held = key()
    assert held != default and held.device.endswith("malloc holding freed memory")
    assert LatencyKey.parse(str(held)) == held
    monkeypatch.setattr(allocator, "_held", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert key().device.endswith("MALLOC_MMAP_THRESHOLD_=1048576")
    monkeypatch.setattr(allocator, "_preloaded_allocator", lambda: "jemalloc")
    assert key().device.endswith(", jemalloc")
    # an accelerator's layers do not depend on the host's allocator
    assert LatencyKey.here("meta", torch.float32, "eager", kind="linear", weight_shape=(8, 8),
                           input_shape=(4, 8)).device == "meta"
