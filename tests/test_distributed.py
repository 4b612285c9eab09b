"""Calibration on torch.distributed: two gloo processes on the CPU, each calibrating on its own shard.

One spawn of two ranks runs every scenario (``_worker``) and leaves its results in a file per rank; the tests
compare the ranks with each other and with one process calibrated on the union of the shards.
"""

from __future__ import annotations

import dataclasses

import datetime
import math
import os
import pathlib
import signal
import subprocess
import sys
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxdeco
from fxdeco import distributed
from tests.models import Residual, residual_batches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
BATCHES = 8


def _model() -> Residual:
    torch.manual_seed(0)
    return Residual().eval()


def _data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, image, labels) batches: the model reads the first two, dwain's loss the labels."""
    g = torch.Generator().manual_seed(5)
    return [(x, image, torch.randint(0, 10, (x.shape[0],), generator=g))
            for x, image in residual_batches(BATCHES, size=32)]


def _inputs(batch: tuple) -> tuple:
    return batch[0], batch[1]


def _loss(output: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(output, batch[2])


def _dwain() -> fxdeco.Dwain:
    return fxdeco.Dwain(_loss, trade_off_factor=2.0, max_accepted_ppl_diff=0.5, min_rank=4, nsr_final_threshold=0.5,
                        show_progress=False)


def _ranks(gm: torch.fx.GraphModule) -> dict[str, int | None]:
    return {d.target: d.rank for d in gm.meta["fxdeco"].decisions}


def _statistics(prepared: fxdeco.PreparedModel) -> dict[str, Any]:
    """Everything of the sums a plan depends on, as plain float64 tensors and numbers."""
    per_site = {t: (s.second_moment(), s.mean(), s.rows, s.samples, float(s.weight))
                for t, s in prepared.statistics.items()}
    raw = {f"{kind}:{k}": (s.sum_outer, s.sum) for kind, stats in (("out", prepared.collected.outputs),
                                                                    ("in", prepared.collected.inputs))
           for k, s in stats.items()}
    return {"per_site": per_site, "raw": raw, "batches": prepared.batches}


def _stack(depth: int) -> torch.nn.Sequential:
    """``depth`` blocks of two Linear layers (``0.0``, ``0.2``, ``1.0``, ...): one block each in sequential mode."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24))
                                 for _ in range(depth)]).eval()


def _prepared(batches: list[tuple], **options: Any) -> fxdeco.PreparedModel:
    return fxdeco.calibrate(fxdeco.prepare(_model(), **options), batches, input_fn=_inputs, show_progress=False)


# ----------------------------------------------------------------------------- the ranks


def _scenarios(rank: int) -> dict[str, Callable[[], Any]]:
    from fxdeco import api
    from fxdeco.methods.falor import speed

    data = _data()
    shard = distributed.shard(data, rank, WORLD)

    def statistics() -> dict[str, Any]:
        # float64 products: the sums are then those of one process up to float64 rounding (float32 products
        # around each rank's own centre differ from one process's by float32 rounding)
        prepared = _prepared(shard, sensitivity=True, stat_dtype=torch.float64)
        reduced = distributed.all_reduce_statistics(prepared)
        again = distributed.all_reduce_statistics(reduced)
        return {**_statistics(reduced), "local_batches": prepared.batches, "idempotent": again is reduced,
                "moments": dict(reduced.sensitivity_moments), "moment_samples": reduced.sensitivity_samples,
                "local_moments": dict(prepared.sensitivity_moments), "local_samples": prepared.sensitivity_samples}

    def local_and_budget() -> dict[str, Any]:
        prepared = _prepared(shard, sensitivity=True)
        first = fxdeco.convert(prepared, nsr_threshold=0.02, rank_multiple=1)
        second = fxdeco.convert(prepared, nsr_threshold=0.02, rank_multiple=1)  # converting twice sums once
        return {"local": _ranks(first), "local_again": _ranks(second),
                "batches": [g.meta["fxdeco"].calibration_batches for g in (first, second)],
                "budget": _ranks(fxdeco.convert(prepared, keep_params=0.5, rank_multiple=1)),
                "budget_nsr": _ranks(fxdeco.convert(prepared, keep_params=0.5, rank_multiple=1,
                                                    budget_criterion="nsr"))}

    def sequential() -> dict[str, Any]:  # each block's statistics summed over the ranks before it is decided
        return {mode: _ranks(fxdeco.transform(_model(), shard, fxdeco.Falor(**options, sequential=True, rank_multiple=1,
                                                                              show_progress=False),
                                              input_fn=_inputs, show_progress=False))
                for mode, options in (("local", {"nsr_threshold": 0.02}), ("budget", {"keep_params": 0.5}))}

    def final() -> dict[str, Any]:
        gm = fxdeco.transform(_model(), shard, nsr_final_threshold=0.01, rank_multiple=1, input_fn=_inputs,
                              show_progress=False)
        decisions = gm.meta["fxdeco"].decisions
        return {"ranks": _ranks(gm), "nsr_final": {d.target: d.nsr_final for d in decisions},
                "metric_batches": gm.meta["fxdeco"].summary["metric_batches"]}

    def dwain() -> dict[str, Any]:
        gm = fxdeco.transform(_model(), shard, _dwain(), input_fn=_inputs)
        decisions = gm.meta["fxdeco"].decisions
        walked = fxdeco.transform(_model(), shard, dataclasses.replace(_dwain(), sequential=True), input_fn=_inputs)
        return {"ranks": _ranks(gm), "ppl_diff": {d.target: d.ppl_diff for d in decisions},
                "nsr_final": {d.target: d.nsr_final for d in decisions},
                "sequential": {d.target: (d.rank, d.ppl_diff) for d in walked.meta["fxdeco"].decisions}}

    def budget_loss() -> dict[str, Any]:  # the measured round by the rise of a loss (LossMeter)
        gm = fxdeco.transform(_model(), shard, fxdeco.Falor(keep_params=0.5, loss_fn=_loss, rank_multiple=1,
                                                             show_progress=False), input_fn=_inputs)
        return _ranks(gm)

    def latency() -> dict[str, Any]:
        speed.TIMING = speed.TimingOptions(repeats=2, warmup=1, min_sample_s=0.001, budget_s=0.1)
        speed.MODEL_WARMUP_S, speed.MODEL_REPEATS, speed.MODEL_MIN_SAMPLE_S = 0.01, 2, 0.002
        timed = []
        probe_sites = speed.probe_sites
        speed.probe_sites = lambda *a, **k: timed.append(1) or probe_sites(*a, **k)
        try:
            gm = fxdeco.transform(_model(), shard, fxdeco.Falor(nsr_threshold=0.05, acceptance="faster",
                                                                 latency_cache=False, show_progress=False),
                                  input_fn=_inputs)
            try:  # timed end to end on rank 0, in rounds: the same plan, or the same refusal, on every rank
                budget = _ranks(fxdeco.transform(_model(), shard, fxdeco.Falor(keep_latency=0.9, latency_cache=False,
                                                                                 show_progress=False),
                                                 input_fn=_inputs))
            except fxdeco.BudgetError as exc:
                budget = str(exc)
        finally:
            speed.probe_sites = probe_sites
        decisions = gm.meta["fxdeco"].decisions
        return {"ranks": _ranks(gm), "seconds": {d.target: (d.seconds_dense, d.seconds_factored) for d in decisions},
                "timed_here": len(timed), "keep_latency": budget}

    def mismatch() -> None:
        prepared = _prepared(shard)
        falor = api.RUNNERS["falor"]

        def skewed(prepared: Any, config: Any) -> tuple:
            plan, decisions, summary = falor(prepared, config)
            if rank == 1:  # one rank decides otherwise for one layer
                decisions[0].rank = (decisions[0].rank or 2) - 1
            return plan, decisions, summary

        api.RUNNERS["falor"] = skewed
        try:
            fxdeco.convert(prepared, nsr_threshold=0.02)
        finally:
            api.RUNNERS["falor"] = falor

    def other_weights(sequential: bool) -> Callable[[], None]:
        def run() -> None:  # the classic mistake: only rank 0 loaded the checkpoint
            model = _model()
            if rank == 0:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(3.0)
            fxdeco.transform(model, shard, fxdeco.Falor(nsr_threshold=10.0, sequential=sequential,
                                                        show_progress=False), input_fn=_inputs)
        return run

    def sequential_other_model(depth: int, blocks: list[str] | None) -> Callable[[], None]:
        def run() -> None:  # rank 1 has another model or cuts it otherwise: the per-block all-reduces went astray
            fxdeco.transform(_stack(depth if rank == 1 else 2), shard,
                             fxdeco.Falor(nsr_threshold=0.05, sequential=True, blocks=blocks if rank == 1 else None,
                                          show_progress=False), input_fn=lambda batch: batch[0])
        return run

    def finetune_refused() -> None:
        config = fxdeco.Dwain(_loss, min_rank=4, finetune_fn=lambda graph, names: None, show_progress=False)
        fxdeco.transform(_model(), shard, config, input_fn=_inputs)

    def lockd_refused() -> None:
        fxdeco.transform(_model(), shard, fxdeco.Lockd(steps=1), input_fn=_inputs)

    def empty_shard(sequential: bool) -> Callable[[], None]:
        def run() -> None:  # more ranks than batches: rank 1's shard is empty
            fxdeco.transform(_model(), shard if rank == 0 else [], fxdeco.Falor(nsr_threshold=0.05,
                                                                                  sequential=sequential,
                                                                                  show_progress=False),
                             input_fn=_inputs)
        return run

    def bad_batch(failing: int, at: int, config: Any, misfit: bool = False) -> Callable[[], None]:
        def run() -> None:  # one rank's batch ``at`` holds a NaN (or does not fit): that rank fails, the other
            batches = list(shard)  # must not wait for it
            if rank == failing:
                x, image, labels = batches[at]
                batches[at] = (x[:, :3] if misfit else torch.full_like(x, math.nan), image, labels)
            fxdeco.transform(_model(), batches, config, input_fn=_inputs, show_progress=False)
        return run

    sequential_config = fxdeco.Falor(nsr_threshold=0.05, sequential=True, show_progress=False)

    return {"statistics": statistics, "local_and_budget": local_and_budget, "budget_loss": budget_loss,
            "bad_later_batch": bad_batch(1, 2, fxdeco.Falor(nsr_threshold=0.05, show_progress=False)),
            "bad_first_batch": bad_batch(0, 0, _dwain()),
            "bad_batch_sequential": bad_batch(1, 2, sequential_config),
            "misfit_batch_sequential": bad_batch(0, 0, sequential_config, misfit=True),
            "sequential": sequential,
            "final": final, "dwain": dwain, "latency": latency, "mismatch": mismatch, "finetune_refused": finetune_refused,
            "lockd_refused": lockd_refused, "other_weights": other_weights(False),
            "other_weights_sequential": other_weights(True), "extra_block_sequential": sequential_other_model(3, None),
            "other_blocks_sequential": sequential_other_model(2, ["0.0", "0.2", "1"]),
            "misspelt_blocks_sequential": sequential_other_model(2, ["3"]),
            "empty_shard": empty_shard(False), "empty_shard_sequential": empty_shard(True)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: every scenario in turn, each result (or its error) saved to ``out_dir/rank{rank}.pt``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # a collective that one rank never reaches fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for name, scenario in _scenarios(rank).items():
            try:
                results[name] = ("ok", scenario())
            except Exception as exc:
                results[name] = ("error", type(exc).__name__, str(exc), traceback.format_exc())
            dist.barrier()
    finally:
        torch.save(results, pathlib.Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' results of every scenario."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(ranks: list[dict[str, Any]], name: str) -> list[Any]:
    for r, results in enumerate(ranks):
        if results[name][0] != "ok":
            pytest.fail(f"rank {r}, {name}: {results[name][1]}: {results[name][2]}\n{results[name][3]}")
    return [results[name][1] for results in ranks]


def _error(ranks: list[dict[str, Any]], name: str) -> list[tuple[str, str]]:
    errors = []
    for r, results in enumerate(ranks):
        assert results[name][0] == "error", f"rank {r}, {name}: no error"
        errors.append((results[name][1], results[name][2]))
    return errors


# ----------------------------------------------------------------------------- the tests


def test_statistics_equal_one_process_on_the_union(ranks: list[dict[str, Any]]) -> None:
    one = _statistics(_prepared(_data(), stat_dtype=torch.float64))
    summed = _ok(ranks, "statistics")
    for result in summed:
        assert result["batches"] == one["batches"] == BATCHES
        assert result["local_batches"] == BATCHES // WORLD  # the caller's own prepared model is left as it was
        assert result["idempotent"]  # a reduced copy is not reduced again
        assert result["per_site"].keys() == one["per_site"].keys()
        for target, (moment, mean, rows, samples, weight) in one["per_site"].items():
            got = result["per_site"][target]
            assert torch.allclose(got[0], moment, rtol=1e-10, atol=1e-10), target
            assert torch.allclose(got[1], mean, rtol=1e-10, atol=1e-12), target
            assert got[2:] == (rows, samples, weight), target
        assert result["raw"].keys() == one["raw"].keys()
        assert any(key.startswith("in:") for key in one["raw"])  # input-side sums were reduced too
        for key, (outer, total) in one["raw"].items():
            assert torch.allclose(result["raw"][key][0], outer, rtol=1e-10, atol=1e-9), key
            assert torch.allclose(result["raw"][key][1], total, rtol=1e-10, atol=1e-9), key
    # the gradient moments (random projections differ by rank, so compare with the ranks' own sums)
    for target, moment in summed[0]["moments"].items():
        assert torch.equal(moment, summed[1]["moments"][target])
        assert torch.allclose(moment, sum(r["local_moments"][target] for r in summed), rtol=1e-12)
    assert summed[0]["moment_samples"] == sum(r["local_samples"] for r in summed) == BATCHES * 32


def test_local_and_budget_plans_agree_across_ranks_and_with_one_process(ranks: list[dict[str, Any]]) -> None:
    zero, one_rank = _ok(ranks, "local_and_budget")
    assert zero == one_rank
    by_loss = _ok(ranks, "budget_loss")
    assert by_loss[0] == by_loss[1] and any(rank is not None for rank in by_loss[0].values())
    assert zero["local"] == zero["local_again"] and zero["batches"] == [BATCHES, BATCHES]
    assert any(rank is not None for rank in zero["budget"].values())
    prepared = _prepared(_data(), sensitivity=True)
    single = {"local": _ranks(fxdeco.convert(prepared, nsr_threshold=0.02, rank_multiple=1)),
              "budget_nsr": _ranks(fxdeco.convert(prepared, keep_params=0.5, rank_multiple=1,
                                                  budget_criterion="nsr"))}
    for mode, plan in single.items():
        assert plan.keys() == zero[mode].keys()
        for target, rank in plan.items():
            got = zero[mode][target]
            assert (rank is None) == (got is None) and abs((rank or 0) - (got or 0)) <= 1, (mode, target, rank, got)


def test_sequential_mode_reduces_each_block(ranks: list[dict[str, Any]]) -> None:
    zero, one_rank = _ok(ranks, "sequential")
    assert zero == one_rank
    for mode, options in (("local", {"nsr_threshold": 0.02}), ("budget", {"keep_params": 0.5})):
        single = _ranks(fxdeco.transform(_model(), _data(), fxdeco.Falor(**options, sequential=True, rank_multiple=1),
                                         input_fn=_inputs, show_progress=False))
        assert any(rank is not None for rank in single.values())
        assert single.keys() == zero[mode].keys()
        for target, rank in single.items():
            got = zero[mode][target]
            assert (rank is None) == (got is None) and abs((rank or 0) - (got or 0)) <= 1, (mode, target, rank, got)


def test_final_output_mode_and_dwain_measure_the_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    final = _ok(ranks, "final")
    assert final[0] == final[1]
    assert final[0]["metric_batches"] == 2 * WORLD  # each rank measured on its own two
    assert any(rank is not None for rank in final[0]["ranks"].values())
    dwain = _ok(ranks, "dwain")
    assert dwain[0] == dwain[1]  # one-shot and sequential (each block's sums and each probe's means reduced)
    assert any(rank is not None for rank in dwain[0]["ranks"].values())
    assert any(rank is not None for rank, _ in dwain[0]["sequential"].values())


def test_latency_is_rank_zeros(ranks: list[dict[str, Any]]) -> None:
    zero, one_rank = _ok(ranks, "latency")
    assert zero == {**one_rank, "timed_here": zero["timed_here"]}
    assert zero["timed_here"] == 2 and one_rank["timed_here"] == 0  # only rank 0 timed the layers


def test_different_plans_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for kind, message in _error(ranks, "mismatch"):
        assert kind == "DistributedError"
        assert "different plans" in message and "on rank 1" in message


def test_different_weights_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    """Rank 0 alone loaded the checkpoint: the statistics of two models must not be summed (one-shot and
    sequential), even when the ranks would happen to choose the same ranks."""
    for scenario in ("other_weights", "other_weights_sequential"):
        for kind, message in _error(ranks, scenario):
            assert kind == "DistributedError", (scenario, message)
            assert "rank 1's weights differ from rank 0's (first: 'inp.weight')" in message, (scenario, message)
            assert "load the same checkpoint on every rank" in message


def test_sequential_mode_checks_the_same_model_before_its_walk(ranks: list[dict[str, Any]]) -> None:
    """A rank with an extra block, or other ``blocks=``, fails clearly on every rank before the first block's
    all-reduce (which would otherwise pair one rank's block with another's)."""
    for kind, message in _error(ranks, "extra_block_sequential"):
        assert kind == "DistributedError", message
        assert "rank 1 prepared another model than rank 0" in message and "'2.0'" in message
    for kind, message in _error(ranks, "other_blocks_sequential"):
        assert kind == "DistributedError", message
        assert "rank 1 cut the model into other blocks than rank 0" in message and "blocks=" in message
    # a scope holding no layer on rank 1 only: rank 1 says so, rank 0 does not wait for it
    (kind0, message0), (kind1, message1) = _error(ranks, "misspelt_blocks_sequential")
    assert kind0 == "DistributedError" and "rank 1" in message0 and "blocks=" in message0, message0
    # (passes.blocks refuses the scope on rank 1; were it to give every layer a block of its own, the blocks differ)
    assert ("'3'" in message1) if kind1 == "ValueError" else (kind1 == "DistributedError" and "blocks=" in message1)


def test_unsupported_options_fail_fast_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for kind, message in _error(ranks, "finetune_refused"):
        assert kind == "ValueError" and "finetune_fn" in message and "process_group=False" in message
    for kind, message in _error(ranks, "lockd_refused"):
        assert kind == "ValueError" and "lockd" in message and "process_group=False" in message


# ----------------------------------------------------------------------------- one process


def test_one_process_is_left_alone() -> None:
    assert distributed.collective(None) is None and distributed.collective(False) is None
    with pytest.raises(distributed.DistributedError, match="not initialised"):
        distributed.collective(object())
    prepared = _prepared(_data()[:2])
    assert distributed.all_reduce_statistics(prepared, False) is prepared


def test_weight_checksum_is_exact() -> None:
    """Equal values give equal checksums whatever the layout; one changed bit or moved value changes it."""
    weight = torch.randn(300, 1000, dtype=torch.float64)
    checksum = distributed.weight_checksum(weight)
    assert distributed.weight_checksum(weight.t().contiguous().t()) == checksum
    nudged = weight.clone()
    nudged[123, 456] = torch.nextafter(nudged[123, 456], torch.tensor(math.inf, dtype=torch.float64))
    assert distributed.weight_checksum(nudged) != checksum
    moved = weight.reshape(-1).roll(distributed.CHECKSUM_ELEMENTS).reshape(weight.shape)  # the same values elsewhere
    assert distributed.weight_checksum(moved) != checksum
    for dtype in (torch.bfloat16, torch.float16, torch.bool, torch.uint8):
        assert distributed.weight_checksum(weight.to(dtype)) == distributed.weight_checksum(weight.to(dtype).clone())
    assert distributed.weight_checksum(torch.empty(3, device="meta")) is None


def test_shard_gives_batch_i_to_rank_i_mod_world() -> None:
    data = list(range(7))
    assert [distributed.shard(data, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(distributed.shard(iter(data), 1, 2)) == [1, 3, 5]
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(data, 2, 2)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on Linux only here")
def test_cli_under_torchrun(tmp_path: pathlib.Path) -> None:
    """``torchrun --nproc-per-node 2 fxdeco decompose``: one output, written by rank 0, from all batches."""
    factory = tmp_path / "mlp.py"
    factory.write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential("
                       "torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fxdeco.cli", "decompose", f"{factory}:build", "--calib", "random", "--input-shape", "16",
               "--batches", "4", "--batch-size", "16", "--nsr-threshold", "0.05", "--dump-format", "dot",
               "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM (not on SIGKILL)
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        pytest.fail("torchrun did not finish in 120 s")
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # rank 0 printed, rank 1 did not
    record = (out / "report.json").read_text()
    assert '"processes": 2' in record
    assert (out / "plan.json").is_file()


@pytest.mark.parametrize("name, failing, what", [("bad_later_batch", 1, "calibrating"),
                                                  ("bad_first_batch", 0, "calibrating on its first batch")])
def test_a_rank_that_fails_calibrating_stops_every_rank_with_the_reason(ranks: list[dict[str, Any]], name: str,
                                                                        failing: int, what: str) -> None:
    # before this, the other rank waited in the statistics' all-reduce until the group's timeout and then failed
    # with gloo's "Connection closed by peer"
    errors = _error(ranks, name)
    kind, message = errors[failing]
    assert kind == "NonFiniteActivationError" and "NaN/Inf" in message
    other_kind, other = errors[1 - failing]
    assert other_kind == "DistributedError" and f"rank {failing} failed {what} (NonFiniteActivationError" in other


@pytest.mark.parametrize("name, failing, kind, what", [
    ("bad_batch_sequential", 1, "NonFiniteActivationError", "calibrating block "),
    ("misfit_batch_sequential", 0, "CalibrationError", "caching its calibration batches")])
def test_sequential_mode_a_rank_that_fails_stops_every_rank_with_the_reason(
        ranks: list[dict[str, Any]], name: str, failing: int, kind: str, what: str) -> None:
    errors = _error(ranks, name)
    assert errors[failing][0] == kind
    other_kind, other = errors[1 - failing]
    assert other_kind == "DistributedError" and f"rank {failing} failed {what}" in other and kind in other


@pytest.mark.parametrize("name", ["empty_shard", "empty_shard_sequential"])
def test_a_rank_with_no_batches_stops_every_rank_with_the_reason(ranks: list[dict[str, Any]], name: str) -> None:
    (kind0, message0), (kind1, message1) = _error(ranks, name)
    assert kind1 == "CalibrationError" and "yielded no batches" in message1
    assert kind0 == "DistributedError" and "rank 1 failed reading its calibration loader" in message0
    assert "yielded no batches" in message0
