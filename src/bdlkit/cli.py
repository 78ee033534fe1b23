"""Command line: `bdlkit run <method>|all [--quick] [--out DIR] [--seed N] [--threads N]`,
`bdlkit report`."""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .experiments import RECIPES, run_recipe
from .report import write_report


def _tune_allocator() -> bool:
    """Make glibc keep freed memory instead of unmapping it (PERF.md: ~25 % faster training).

    Only the CLI does this, never the library; BDLKIT_NO_MALLOC_TUNING=1 turns it off.
    Returns whether the allocator was tuned.
    """
    if os.environ.get("BDLKIT_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        return False
    print("bdlkit: tuned glibc malloc for speed (set BDLKIT_NO_MALLOC_TUNING=1 to disable)",
          file=sys.stderr)
    return True


def _environment(malloc_tuned: bool) -> dict[str, Any]:
    """What a re-run needs to reproduce a recipe's figures.

    The intra-op thread count matters: it changes the order of float reductions, so the same
    seed gives different trained networks at 1 and at 2 threads.
    """
    return {"bdlkit": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "malloc_tuned": malloc_tuned,
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bdlkit",
        description="Bayesian deep learning tools: run a method's recipe end to end and report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one recipe or all of them and write OUT/report.md")
    run.add_argument("method", help=f"one of: {', '.join(RECIPES)}, all")
    run.add_argument("--quick", action="store_true", help="small budget (minutes), for a demo")
    run.add_argument("--out", default="runs/latest", help="output directory (default runs/latest)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch intra-op threads (default: torch's own choice); figures are "
                          "reproducible only at the same thread count")
    rep = sub.add_parser("report", help="re-render OUT/report.md from OUT/*/result.json")
    rep.add_argument("out", help="a directory written by `bdlkit run`")
    sub.add_parser("list", help="list the available recipes")
    return parser


def _run(method: str, out: Path, quick: bool, seed: int, malloc_tuned: bool) -> int:
    names = list(RECIPES) if method == "all" else [method]
    failed = []
    for name in names:
        print(f"bdlkit: running {name} ({'quick' if quick else 'full'}) -> {out / name}",
              file=sys.stderr)
        environment = _environment(malloc_tuned)
        start = time.perf_counter()
        try:
            result = run_recipe(name, out, quick=quick, seed=seed)
        except Exception as exc:  # noqa: BLE001 - one failed recipe must not hide the others
            traceback.print_exc()
            result = {"title": name, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        result["wall_time_s"] = time.perf_counter() - start
        result.setdefault("config", {}).update({"quick": quick, "seed": seed})
        result["environment"] = environment
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "result.json").write_text(json.dumps(result, indent=2, default=float))
    report = write_report(out)
    print(f"bdlkit: report written to {report}")
    if failed:
        print(f"bdlkit: failed recipes: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bdlkit`` console script; returns the exit status.

    Example:
        >>> main(["list"])  # doctest: +ELLIPSIS
        baseline
        ...
        0
    """
    args = _parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(RECIPES))
        return 0
    if args.command == "report":
        try:
            print(write_report(args.out))
        except FileNotFoundError as exc:
            print(f"bdlkit: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.method != "all" and args.method not in RECIPES:
        print(f"bdlkit: error: unknown method {args.method!r}; valid: "
              f"{', '.join(RECIPES)}, all", file=sys.stderr)
        return 2
    if args.seed < 0:
        print("bdlkit: error: --seed must be >= 0", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("bdlkit: error: --threads must be >= 1", file=sys.stderr)
        return 2
    malloc_tuned = _tune_allocator()
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args.method, Path(args.out), args.quick, args.seed, malloc_tuned)
    finally:  # main() is also called from Python: leave the caller's setting as it was
        torch.set_num_threads(previous_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
