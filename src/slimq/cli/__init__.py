"""Command line: ``slimq demo`` (also ``python -m slimq demo``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimq", description="Compress PyTorch models: prune or 2:4, "
                                     "INT8 quantization-aware retraining, INT8 ONNX export.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress a small CNN on scikit-learn's digits end to end")
    demo.add_argument("--out", default="slimq_demo", help="output folder (default: slimq_demo)")
    demo.add_argument("--config", default="", help="config file (default: the shipped demo config)")
    demo.add_argument("--fast", action="store_true", help="few epochs (for smoke tests)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    from ..errors import SlimqError

    try:
        if args.command == "demo":
            from .demo import run_demo

            epochs = (2, 1) if args.fast else (12, 3)
            run_demo(args.out, args.config, *epochs, progress=not args.no_progress)
    except SlimqError as exc:
        print(f"slimq: error: {exc}", file=sys.stderr)
        return 2
    return 0
