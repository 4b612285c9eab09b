"""The ``fxdeco`` command line: ``decompose``, ``report``, ``dump`` and ``demo``.

Exit codes: 0 success, 2 usage error, 1 failure (a one-line reason; the
traceback only with ``--debug``).

``fxdeco decompose MODEL --calib SOURCE --out DIR`` writes into ``DIR``:

* ``plan.json`` and the weights (:func:`fxdeco.io.serialize.save`; reload with
  ``fxdeco.load(DIR, model)``);
* ``report.txt`` and ``report.json``: the per-layer table and totals, with the
  model and the calibration data named (random data is labelled as such);
* ``graph.html`` (before/after) and ``graph.dot`` (:func:`fxdeco.io.dump.dump`);
* ``cli.json``: the model spec and input (kind, per-sample shape, dtype), so
  ``fxdeco dump DIR`` can rebuild the model and draw the graphs again.

Under ``torchrun --nproc-per-node N fxdeco decompose ...`` (``WORLD_SIZE`` > 1 in
the environment) each process joins a gloo process group, calibrates on its
share of the batches (batch ``i`` goes to process ``i % N``), the statistics are
all-reduced (:mod:`fxdeco.distributed`) and only rank 0 writes ``--out`` and prints.

``--calib random`` feeds images unless the model is not an image model:
``--input-shape 32`` (or ``3,224,224``: one sample, no batch dimension) sets
the shape of the noise, and a factory model may declare it
(:mod:`fxdeco.cli.model_specs`). What was fed (dtype and shape) is printed and
recorded; the first batch is run through the model before anything slow, so a
shape that does not fit fails at once.

This module imports nothing heavy at import time: ``report``, ``--help`` and
usage errors do not need torch, so ``decompose``, ``dump`` and ``demo`` import
torch and the rest of fxdeco when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

log = logging.getLogger("fxdeco")

CLI_FILE = "cli.json"
CLI_SCHEMA = "fxdeco.cli"
CLI_VERSION = 1
REPORT_TEXT = "report.txt"
REPORT_JSON = "report.json"


class CLIError(Exception):
    """A failure with a message meant for the user as it is (no exception type in front)."""


# Modules whose errors have messages that say it all; looked up only if already imported (they import torch).
_USER_ERRORS = (("fxdeco.cli.model_specs", "ModelSpecError"), ("fxdeco.cli.calib_sources", "CalibrationSourceError"))


def _is_user_error(exc: BaseException) -> bool:
    """Whether ``exc``'s message says it all (others are shown with their type), without importing torch.

    Example:
        >>> _is_user_error(CLIError("no such directory")), _is_user_error(KeyError("x"))
        (True, False)
    """
    if isinstance(exc, CLIError):
        return True
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


# ----------------------------------------------------------------------------- demo


def _allocator_for_timing(args: argparse.Namespace, times: bool) -> None:
    """Before a command that times layers: keep freed memory in this process (glibc) unless
    ``--system-allocator``, so that large activations stop page-faulting on every call and the layers timed alone
    add up to the model (under glibc's defaults the demo's layers timed alone summed to 1.7x the whole model's
    time, and acceptance kept half as many layers factored). See :mod:`fxdeco.latency.allocator`."""
    if times and not args.system_allocator:
        from fxdeco.latency.allocator import hold_freed_memory

        hold_freed_memory()


def _demo(args: argparse.Namespace) -> int:
    from fxdeco.cli.demo import DemoConfig, format_demo, run_demo

    _allocator_for_timing(args, times=True)  # the demo accepts a layer only where it is measured faster
    cfg = DemoConfig(nsr_threshold=args.nsr_threshold, calib_sentences=args.calib_sentences,
                     eval_sentences=args.eval_sentences, batch_size=args.batch_size, max_length=args.max_length,
                     mask_padding=not args.no_stat_mask)
    print(format_demo(run_demo(cfg)))
    return 0


# ----------------------------------------------------------------------------- decompose


def _out_dir(path: str) -> pathlib.Path:
    """Create (or reuse) the output directory now and check it can be written, before any slow work."""
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; give a new or an existing directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out} cannot be created: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out} is not writable")
    return out


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("keep_params", "keep_macs", "keep_latency", "nsr_threshold", "rank_multiple", "acceptance"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.skip:
        options["skip"] = list(args.skip)
    return options


def _reusable_spec(spec: Any) -> str:
    """``spec``'s text with a file or hf: directory made absolute, for ``cli.json``: ``fxdeco dump`` rebuilds the
    model from it, and a relative path would name another file (or none) when dump runs from another directory.

    Example:
        >>> from fxdeco.cli.model_specs import ModelSpec
        >>> _reusable_spec(ModelSpec("torchvision:resnet18", "torchvision", "resnet18"))
        'torchvision:resnet18'
        >>> _reusable_spec(ModelSpec("/m/net.py:build", "file", "/m/net.py", "build"))
        '/m/net.py:build'
    """
    if spec.kind == "file":
        return f"{pathlib.Path(spec.name).resolve()}:{spec.factory}"
    if spec.kind == "hf":
        return f"hf:{pathlib.Path(spec.name).resolve()}"
    return spec.text


def _report_header(spec_text: str, weights: str, calib_description: str, method: str, options: dict[str, Any]) -> str:
    opts = " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    return (f"model: {spec_text}, {weights}\n"
            f"calibration: {calib_description}\n"
            f"method: {method} ({opts})\n")


def _clear_previous_outputs(out: pathlib.Path) -> list[str]:
    """Delete the files an earlier ``decompose --out`` run left in ``out`` (plan, weights, reports, cli.json, graph
    dumps), and return their names. Run once the new decomposition exists, before writing it: a graph dump of a format
    this run does not write, or a report a failure leaves unwritten, would otherwise stay beside the new plan as if
    it described it (a graph.html of the previous model was listed among the files written)."""
    from fxdeco.io.serialize import PLAN_FILE, WEIGHT_FILES

    owned = [PLAN_FILE, *WEIGHT_FILES.values(), REPORT_TEXT, REPORT_JSON, CLI_FILE, *(f"graph.{f}" for f in FORMATS)]
    removed = []
    for name in owned:
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    if removed:
        log.info("replaced the previous run's %s in %s", ", ".join(removed), out)
    return removed


def _write_report(out: pathlib.Path, gm: Any, header: str, meta: dict[str, Any]) -> str:
    from fxdeco.io.report import report

    rep = report(gm)
    text = header + "\n" + rep.table() + "\n"
    (out / REPORT_TEXT).write_text(text, encoding="utf-8")
    payload = {**meta, "totals": rep.totals, "rows": rep.rows}
    (out / REPORT_JSON).write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _dumps(gm: Any, model: Any, out: pathlib.Path, formats: Sequence[str], example: Any) -> list[pathlib.Path]:
    from fxdeco.io.dump import dump

    return [dump(gm, out / f"graph.{fmt}", fmt, original=model, example_inputs=example) for fmt in formats]


def _process_group() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the group): under torchrun (``WORLD_SIZE`` > 1) a gloo group
    from torchrun's environment, else (0, 1, False)."""
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise CLIError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")  # CPU collectives: the statistics are all-reduced on the CPU in float64
    log.info("rank %d of %d processes (torchrun)", dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size(), True


def _quiet() -> None:
    """On ranks other than 0: no warnings and only errors in the log (rank 0 says it all once)."""
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def _decompose(args: argparse.Namespace) -> int:
    rank, world, started = _process_group()
    try:
        if rank != 0:  # only rank 0 writes and prints
            _quiet()
            return _decompose_into(None, args, rank, world)
        created = not pathlib.Path(args.out).exists()
        out = _out_dir(args.out)  # before the slow part
        try:
            return _decompose_into(out, args, rank, world)
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a failure leaves no empty directory behind
            raise
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _decompose_into(out: pathlib.Path | None, args: argparse.Namespace, rank: int = 0, world: int = 1) -> int:
    """Calibrate (this rank's share of the batches), decompose; rank 0 writes into ``out`` and prints."""
    import torch

    import fxdeco
    from fxdeco.cli.calib_sources import check_first_batch, input_info, load_calibration
    from fxdeco.cli.model_specs import build_model, describe_weights, parse_model_spec
    from fxdeco.io.serialize import save
    from fxdeco.latency.allocator import describe_allocator

    spec = parse_model_spec(args.model, args.weights)
    torch.manual_seed(args.seed)  # random weights, when the model has them, are reproducible
    built = build_model(spec)
    calib = load_calibration(args.calib, built, batches=args.batches, batch_size=args.batch_size,
                             image_size=args.image_size, max_length=args.max_length, seed=args.seed,
                             input_shape=args.input_shape)
    if calib.random:
        log.warning("calibrating on random data (%s): the ranks reflect noise statistics, not your data",
                    calib.fed)
    else:
        log.info("calibration batches: %s", calib.fed)
    check_first_batch(built, calib)  # a shape that does not fit fails now, not deep inside the decomposition
    options = _method_options(args)
    timed = options.get("keep_latency") is not None or options.get("acceptance") == "faster"
    _allocator_for_timing(args, times=timed)
    batches = calib.batches
    if world > 1:
        from fxdeco.distributed import shard

        if len(batches) < world:
            raise CLIError(f"{len(batches)} calibration batch(es) for {world} processes: every process needs at "
                           f"least one; pass --batches {world} or more")
        batches = shard(batches, rank, world)  # batch i to rank i % world; the statistics are all-reduced
    gm = fxdeco.transform(built.model, batches, method=args.method, capture=args.capture,
                          stat_mask_fn=calib.stat_mask_fn, show_progress=args.progress if rank == 0 else False,
                          **options)
    if rank != 0 or out is None:
        return 0  # every rank made the same plan (checked); rank 0 writes it
    _clear_previous_outputs(out)
    save(gm, out)
    meta = {"model": spec.text, "weights": describe_weights(spec),
            "calibration": {"source": calib.source, "random": calib.random, "description": calib.description},
            "method": args.method, "options": options}
    if world > 1:
        meta["calibration"]["processes"] = world  # torchrun: batch i was calibrated on process i % processes
    text = _write_report(out, gm, _report_header(spec.text, meta["weights"], calib.description, args.method, options),
                         meta)
    cli = {"schema": CLI_SCHEMA, "version": CLI_VERSION, "model": _reusable_spec(spec),
           "weights_file": str(pathlib.Path(spec.weights).resolve()) if spec.weights else None,
           "input": input_info(calib), "seed": args.seed, "capture": args.capture,
           "calibration": meta["calibration"], "method": args.method, "options": options}
    (out / CLI_FILE).write_text(json.dumps(cli, indent=1, default=_json_default) + "\n", encoding="utf-8")
    written = _dumps(gm, built.model, out, args.dump_format, calib.example())
    print(text, end="")
    summary = gm.meta["fxdeco"].summary
    if summary.get("latency_measured_s"):
        print(f"measured speed-up on this machine: {summary['latency_original_s'] / summary['latency_measured_s']:.2f}x "
              f"({summary['latency_original_s'] * 1e3:.3g} ms -> {summary['latency_measured_s'] * 1e3:.3g} ms per "
              f"calibration batch; {describe_allocator()})")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    log.info("graph dumps: %s", ", ".join(map(str, written)))
    return 0


# ----------------------------------------------------------------------------- report / dump


def _saved_dir(path: str, needed: str) -> pathlib.Path:
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a directory written by fxdeco decompose --out")
    if not (folder / needed).is_file():
        raise CLIError(f"{folder} has no {needed}; write it with: fxdeco decompose MODEL --calib SOURCE --out {folder}")
    return folder


def _report(args: argparse.Namespace) -> int:
    folder = _saved_dir(args.dir, REPORT_JSON if args.json else REPORT_TEXT)
    text = (folder / (REPORT_JSON if args.json else REPORT_TEXT)).read_text(encoding="utf-8")
    if args.json:  # a script reads this: never pass on a damaged file as if it were a report
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{folder / REPORT_JSON} is not valid JSON ({exc}); write it again with fxdeco "
                           "decompose --out") from exc
    print(text, end="")
    return 0


def _read_cli_json(folder: pathlib.Path) -> dict[str, Any]:
    try:
        cli = json.loads((folder / CLI_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{folder / CLI_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(cli, dict) or cli.get("schema") != CLI_SCHEMA:
        raise CLIError(f"{folder / CLI_FILE} was not written by fxdeco decompose")
    if cli.get("version") != CLI_VERSION:
        raise CLIError(f"{folder / CLI_FILE} has version {cli.get('version')!r}; this fxdeco reads version "
                       f"{CLI_VERSION}: run fxdeco decompose again")
    return cli


def _dump(args: argparse.Namespace) -> int:
    import torch

    from fxdeco.cli.calib_sources import example_batch
    from fxdeco.cli.model_specs import build_model, parse_model_spec
    from fxdeco.io.serialize import load

    folder = _saved_dir(args.dir, CLI_FILE)
    cli = _read_cli_json(folder)
    torch.manual_seed(cli.get("seed", 0))
    built = build_model(parse_model_spec(cli["model"], cli.get("weights_file")))
    example = example_batch(built, cli["input"])
    gm = load(folder, built.model, example_inputs=example)
    out = _out_dir(args.out) if args.out else folder
    for path in _dumps(gm, built.model, out, args.format, example):
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def _falor_option(name: str, parse: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse type for falor's option ``name``: parsed, then checked by ``fxdeco.Falor`` itself, so the
    command line takes exactly the range the library takes.

    Example:
        >>> _falor_option("keep_params")("0.5")
        0.5
        >>> _falor_option("keep_params")("2")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: keep_params must be a number in (0.0, 1.0], got 2.0
    """
    def check(text: str) -> Any:
        from fxdeco.methods.falor.config import Falor  # light: dataclasses only

        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {'integer' if parse is int else 'number'}: {text!r}") from None
        try:
            Falor(**{name: value})
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    check.__name__ = name  # argparse names the type in its messages
    return check


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    """A per-sample shape: positive sizes separated by commas (or x), batch dimension excluded.

    Example:
        >>> _shape("32"), _shape("3,224,224"), _shape("3x32x32")
        ((32,), (3, 224, 224), (3, 32, 32))
    """
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shape: {text!r}; write sizes separated by commas, e.g. 32 or "
                                         "3,224,224 (one sample, no batch dimension)") from None
    if any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text}")
    return shape


FORMATS = ("dot", "svg", "html")


def _check_decompose(args: argparse.Namespace) -> None:
    """Usage errors (exit 2) of decompose options that parse alone but not together."""
    if args.input_shape is None:
        return
    if args.calib != "random":
        args.parser.error(f"--input-shape sets the shape of random data; --calib {args.calib} brings its own inputs")
    if args.image_size is not None:
        args.parser.error("give --input-shape or --image-size, not both")


def _add_decompose(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "decompose", parents=[common], help="decompose a model and save plan, weights, report and graph dumps",
        description="Capture MODEL, calibrate it on SOURCE, decompose it and write the plan, weights, report "
                    "(text + JSON) and graph dumps into DIR.",
        epilog="MODEL: torchvision:NAME or timm:NAME (random weights unless --weights; nothing is downloaded), "
               "hf:DIR (a local Hugging Face model directory; offline), or path/to/file.py:FACTORY (a function "
               "returning an nn.Module). SOURCE: an image folder, fashion-mnist[:DIR] (default "
               "/usr/share/datasets/fashion-mnist), a text file (hf: models; tokenized with the model's tokenizer), "
               "or random (noise: labelled as RANDOM DATA in the output and report; images, or tensors of "
               "--input-shape for models that do not take images). Example: fxdeco decompose "
               "torchvision:resnet18 --keep-params 0.6 --calib fashion-mnist --out r18")
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME, timm:NAME, hf:DIR or path/to/file.py:FACTORY")
    p.add_argument("--method", default="falor", choices=["falor"], help="decomposition method (default falor)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep-params", type=_falor_option("keep_params"), metavar="F",
                        help="keep this fraction of the model's parameters (budget mode)")
    budget.add_argument("--keep-macs", type=_falor_option("keep_macs"), metavar="F",
                        help="keep this fraction of the model's MACs per sample (budget mode)")
    budget.add_argument("--keep-latency", type=_falor_option("keep_latency"), metavar="F",
                        help="keep this fraction of the model's latency, measured on this machine at the calibration "
                             "batch's shapes (budget mode; layers are timed once and cached in ~/.cache/fxdeco)")
    budget.add_argument("--nsr-threshold", type=_falor_option("nsr_threshold"), metavar="F",
                        help="per-layer output noise-to-signal bound (default mode; falor's default 0.02)")
    p.add_argument("--calib", required=True, metavar="SOURCE",
                   help="image folder, fashion-mnist[:DIR], text file (hf: models) or random")
    p.add_argument("--batches", type=_positive, default=8, metavar="N", help="calibration batches (default 8)")
    p.add_argument("--batch-size", type=_positive, default=16, metavar="B", help="samples per batch (default 16)")
    p.add_argument("--image-size", type=_positive, metavar="S",
                   help="image side in pixels (default: the model's, else 28 for Fashion-MNIST and 224 otherwise)")
    p.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                   help="--calib random only: shape of one sample, batch dimension excluded, e.g. 32 for an MLP "
                        "or 3,224,224 (default: what a FILE.py model declares as example_input_shape, the "
                        "in_features of its first layer if that is an nn.Linear, else images)")
    p.add_argument("--max-length", type=_positive, default=128, metavar="L",
                   help="tokens per text sample at most (hf: models; default 128)")
    p.add_argument("--weights", metavar="FILE", help="state_dict file (.pt/.pth or .safetensors) to load first")
    p.add_argument("--rank-multiple", type=_falor_option("rank_multiple", int), metavar="K",
                   help="round ranks up to a multiple of K")
    p.add_argument("--acceptance", choices=["auto", "params", "faster"], default=None,
                   help="factorize a layer only where it saves parameters (params) or is measured faster (faster); "
                        "default auto: faster with --keep-latency, else params")
    p.add_argument("--skip", action="append", metavar="GLOB", help="keep layers matching GLOB dense (repeatable)")
    p.add_argument("--capture", choices=["auto", "symbolic", "export"], default="auto",
                   help="how to capture the model (default auto: symbolic tracing, then torch.export)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, random data and sampling")
    p.add_argument("--dump-format", nargs="+", choices=FORMATS, default=["html", "dot"], metavar="FMT",
                   help="graph dumps to write: dot, svg, html (default: html dot)")
    p.add_argument("--progress", action="store_true", default=None, help="show progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if absent)")
    _add_system_allocator(p)
    p.set_defaults(func=_decompose, check=_check_decompose, parser=p)


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common],
                          help="decompose all-MiniLM-L6-v2 on real English text and report fidelity",
                          description="Decompose the pretrained all-MiniLM-L6-v2 sentence encoder with falor, "
                                      "calibrated and evaluated on disjoint sentences from the Python standard "
                                      "library's docstrings.")
    demo.add_argument("--nsr-threshold", type=_falor_option("nsr_threshold"), default=0.02, metavar="F",
                      help="per-layer output NSR bound, in (0, 1] (default 0.02)")
    demo.add_argument("--calib-sentences", type=_positive, default=512, metavar="N",
                      help="calibration sentences (default 512)")
    demo.add_argument("--eval-sentences", type=_positive, default=512, metavar="N",
                      help="evaluation sentences (default 512)")
    demo.add_argument("--batch-size", type=_positive, default=32, metavar="B", help="sentences per batch (default 32)")
    demo.add_argument("--max-length", type=_positive, default=64, metavar="L",
                      help="tokens per sentence at most (default 64)")
    demo.add_argument("--no-stat-mask", action="store_true",
                      help="count padding tokens in the layers' statistics (default: masked out by the attention mask)")
    _add_system_allocator(demo)
    demo.set_defaults(func=_demo)


def _add_system_allocator(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-allocator", action="store_true",
                        help="time under the C allocator's default settings (default: when the command times "
                             "layers, glibc keeps freed memory in the process, as for serving; large activations "
                             "otherwise page-fault on every call)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxdeco`` argument parser (``--help`` on every subcommand)."""
    parser = argparse.ArgumentParser(prog="fxdeco", description="Low-rank decomposition of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    # The same switches after the subcommand; SUPPRESS keeps a subcommand's default from hiding the main one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_decompose(sub, common)
    rep = sub.add_parser("report", parents=[common], help="print the report saved by decompose",
                         description="Print the report fxdeco decompose saved in DIR.")
    rep.add_argument("dir", metavar="DIR", help="a directory written by fxdeco decompose --out")
    rep.add_argument("--json", action="store_true", help="print report.json instead of the table")
    rep.set_defaults(func=_report)
    dmp = sub.add_parser("dump", parents=[common], help="(re)write graph dumps of a saved decomposition",
                         description="Rebuild the model recorded in DIR/cli.json, load the saved plan and weights, "
                                     "and write graph dumps (graph.<format>) into DIR or --out.")
    dmp.add_argument("dir", metavar="DIR", help="a directory written by fxdeco decompose --out")
    dmp.add_argument("--format", nargs="+", choices=FORMATS, default=["html", "dot"], metavar="FMT",
                     help="dot, svg and/or html (default: html dot); svg needs Graphviz, else DOT is written")
    dmp.add_argument("--out", metavar="OUTDIR", help="write the dumps here instead of DIR")
    dmp.set_defaults(func=_dump)
    _add_demo(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxdeco`` command."""
    args = build_parser().parse_args(argv)  # exits with 2 on usage errors
    if hasattr(args, "check"):
        args.check(args)  # options that parse alone but not together: also exit 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        if _is_user_error(exc):
            print(f"fxdeco: error: {first}", file=sys.stderr)
        else:
            print(f"fxdeco: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
