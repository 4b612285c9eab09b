"""The ``fxdeco`` command line.

Exit codes: 0 success, 2 usage error, 1 failure (a one-line reason; the
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

log = logging.getLogger("fxdeco")


def _demo(args: argparse.Namespace) -> int:
    from fxdeco.demo import DemoConfig, format_demo, run_demo

    cfg = DemoConfig(nsr_threshold=args.nsr_threshold, calib_sentences=args.calib_sentences,
                     eval_sentences=args.eval_sentences, batch_size=args.batch_size, max_length=args.max_length,
                     mask_padding=not args.no_stat_mask)
    print(format_demo(run_demo(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxdeco", description="Low-rank decomposition of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="decompose all-MiniLM-L6-v2 on real English text and report fidelity",
                          description="Decompose the pretrained all-MiniLM-L6-v2 sentence encoder with falor, "
                                      "calibrated and evaluated on disjoint sentences from the Python standard "
                                      "library's docstrings.")
    demo.add_argument("--nsr-threshold", type=float, default=0.02, help="per-layer output NSR bound (default 0.02)")
    demo.add_argument("--calib-sentences", type=int, default=512, help="calibration sentences (default 512)")
    demo.add_argument("--eval-sentences", type=int, default=512, help="evaluation sentences (default 512)")
    demo.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default 32)")
    demo.add_argument("--max-length", type=int, default=64, help="tokens per sentence at most (default 64)")
    demo.add_argument("--no-stat-mask", action="store_true",
                      help="count padding tokens in the layers' statistics (default: masked out by the attention mask)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxdeco`` command."""
    args = build_parser().parse_args(argv)  # exits with 2 on usage errors
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"fxdeco: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
