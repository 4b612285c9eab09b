"""LatencyKey and LatencyTable: stable keys, a JSON cache that survives restarts, corruption and other processes."""

import json
import os

import pytest
import torch

from fxdeco.latency.table import LatencyKey, LatencyTable, default_path


def key(**changes):
    fields = {"device": "cpu:Test CPU", "torch_version": "2.5.0", "dtype": "float32", "threads": 2,
              "backend": "eager", "kind": "conv2d", "weight_shape": (16, 8, 3, 3), "input_shape": (4, 8, 32, 32),
              "stride": 2, "padding": 1, "dilation": (1, 1), "bias": False}
    return LatencyKey(**{**fields, **changes})


def test_key_string_is_stable_and_parses_back():
    k = key()
    assert str(k) == ("conv2d w=16x8x3x3 x=4x8x32x32 s=2x2 p=1x1 d=1x1 bias=0 | float32 eager threads=2 "
                      "| cpu:Test CPU | torch 2.5.0")
    for k in (key(), key(padding="same", stride=1, channels_last=True), key(kind="linear", weight_shape=(3, 5),
                                                                          input_shape=(2, 7, 5), bias=True)):
        assert LatencyKey.parse(str(k)) == k
    assert key(stride=(2, 2), padding=[1, 1]) == key()  # normalised
    with pytest.raises(ValueError, match="not a latency key"):
        LatencyKey.parse("linear w=3")
    with pytest.raises(ValueError, match="backend"):
        key(backend="tensorrt")


def test_keys_differ_by_dtype_threads_backend_and_layer():
    base = key()
    others = [key(dtype="float16"), key(threads=1), key(backend="inductor"), key(input_shape=(8, 8, 32, 32)),
              key(bias=True), key(device="cuda:Some GPU"), key(torch_version="2.6.0"), key(channels_last=True)]
    assert len({base, *others}) == len(others) + 1
    assert len({str(k) for k in [base, *others]}) == len(others) + 1


def test_key_here_records_this_machine_and_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = LatencyKey.here("cpu", torch.float32, "eager", kind="linear", weight_shape=(4, 4), input_shape=(2, 4))
        torch.set_num_threads(2)
        two = LatencyKey.here("cpu", torch.float32, "eager", kind="linear", weight_shape=(4, 4), input_shape=(2, 4))
    finally:
        torch.set_num_threads(before)
    assert (one.threads, two.threads) == (1, 2) and one != two
    half = LatencyKey.here("cpu", torch.bfloat16, "eager", kind="linear", weight_shape=(4, 4), input_shape=(2, 4))
    assert half.dtype == "bfloat16" and half.torch_version == torch.__version__ and half.device.startswith("cpu:")


def test_table_round_trips_through_disk(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    table = LatencyTable(path)
    table.record(key(), dense=3e-4, factored={8: 1e-4})
    table.record(key(), factored={16: 2e-4})
    table.record(key(threads=1), dense=5e-4)
    again = LatencyTable(path)
    assert len(again) == 2
    assert again.dense(key()) == 3e-4
    assert again.get(key()).factored == {8: 1e-4, 16: 2e-4}
    assert again.dense(key(threads=1)) == 5e-4 and again.factored(key(threads=1), 8) is None
    data = json.loads(path.read_text())
    assert data["format"] == "fxdeco.latency" and data["version"] == 1
    assert sorted(os.listdir(path.parent)) == ["latency.json", "latency.json.lock"]  # no temporary files left


def test_two_tables_on_one_file_merge_their_measurements(tmp_path):
    path = tmp_path / "latency.json"
    first, second = LatencyTable(path), LatencyTable(path)  # e.g. two processes, opened before either wrote
    first.record(key(), dense=1.0)
    second.record(key(threads=1), dense=2.0)
    merged = LatencyTable(path)
    assert merged.dense(key()) == 1.0 and merged.dense(key(threads=1)) == 2.0


def test_corrupt_file_is_tolerated_with_a_warning_and_replaced(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text('{"format": "fxdeco.latency", "entries": {')  # truncated
    with pytest.warns(UserWarning, match="corrupt"):
        table = LatencyTable(path)
    assert len(table) == 0
    table.record(key(), dense=1.0)
    assert LatencyTable(path).dense(key()) == 1.0


def test_foreign_file_is_ignored_and_never_overwritten(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text('{"something": "else"}')
    with pytest.warns(UserWarning, match="not an fxdeco latency cache"):
        table = LatencyTable(path)
    table.record(key(), dense=1.0)
    assert table.dense(key()) == 1.0 and table.path is None
    assert path.read_text() == '{"something": "else"}'


def test_newer_version_and_malformed_entries(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"format": "fxdeco.latency", "version": 99, "entries": {}}))
    with pytest.warns(UserWarning, match="version 99"):
        assert LatencyTable(path).path is None
    path.write_text(json.dumps({"format": "fxdeco.latency", "version": 1, "entries": {
        str(key()): {"dense": 1.0, "factored": {"4": 0.5}}, "garbage": {"dense": 1.0},
        str(key(threads=1)): {"dense": "fast"}}}))
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        table = LatencyTable(path)
    assert len(table) == 1 and table.factored(key(), 4) == 0.5


def test_default_path_follows_FXDECO_CACHE_DIR(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDECO_CACHE_DIR", str(tmp_path / "cache"))
    assert default_path() == tmp_path / "cache" / "latency.json"
    LatencyTable().record(key(), dense=1.0)
    assert LatencyTable(True).dense(key()) == 1.0


def test_in_memory_table_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDECO_CACHE_DIR", str(tmp_path))
    for path in (None, False):
        table = LatencyTable(path)
        table.record(key(), dense=1.0, factored={2: 0.5})
        assert table.dense(key()) == 1.0 and table.missing(key(), [2, 3]) == (False, [3])
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_keeps_measurements_in_memory(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    table = LatencyTable(blocker / "latency.json")  # its folder cannot be created
    with pytest.warns(UserWarning, match="cannot write"):
        table.record(key(), dense=1.0)
    assert table.dense(key()) == 1.0 and table.path is None
