"""Command line: ``slimq demo | plan | inspect`` (also ``python -m slimq ...``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimq", description="Compress PyTorch models: channel pruning or 2:4 sparsity, INT8 "
                                  "quantization-aware retraining, INT8 ONNX export.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compress a small CNN on scikit-learn's digits end to end")
    demo.add_argument("--out", default="slimq_demo", help="output folder (default: slimq_demo)")
    demo.add_argument("--config", default="", help="config file (default: the shipped prune 40%% + INT8 config)")
    demo.add_argument("--fast", action="store_true", help="a few epochs only (smoke test)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    plan = sub.add_parser("plan", help="dry run: what a config does to each layer of a model")
    plan.add_argument("config", help="simple config file (protobuf text format; - for standard input)")
    plan.add_argument("--model", required=True,
                      help="torchvision:NAME (random init), FILE.py:CALLABLE or MODULE:CALLABLE")
    plan.add_argument("--input-shape", action="append", required=True, metavar="N,C,H,W",
                      help="shape of an example input (repeat for several inputs)")
    plan.add_argument("--json", action="store_true", help="JSON instead of a table")

    inspect = sub.add_parser("inspect", help="summarise a record file")
    inspect.add_argument("record", help="record file written by slimq or AMCT (- for standard input)")
    inspect.add_argument("--json", action="store_true", help="JSON instead of text")
    return parser


def _path(arg: str) -> str:
    """``-`` means standard input (any readable path works too, pipes such as ``<(...)`` included)."""
    return "/dev/stdin" if arg == "-" else arg


def main(argv: Optional[List[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    from ..errors import SlimqError

    try:
        if args.command == "demo":
            from .demo import run_demo

            epochs = (3, 1) if args.fast else (12, 4)
            run_demo(args.out, args.config, *epochs, progress=not args.no_progress,
                     latency_runs=30 if args.fast else 300)
        elif args.command == "plan":
            from .commands import run_plan

            print(run_plan(_path(args.config), args.model, args.input_shape, args.json))
        else:
            from .commands import run_inspect

            print(run_inspect(_path(args.record), args.json))
    except SlimqError as exc:
        print(f"slimq: error: {exc}", file=sys.stderr)
        return 2
    return 0
