"""Run the ``sbp`` recipe for some of its networks only, optionally merged with an earlier run.

``bdlkit run sbp`` trains both networks (LeNet-500-300 takes 30+ min here). This runs
``bdlkit.experiments.sbp.run(..., nets=[...])`` into ``OUT/sbp`` exactly as the CLI would
(``result.json``, figures, ``OUT/report.md``); with ``--merge`` the ``result.json`` of an earlier
full run supplies the networks not re-run (``sbp.merge_results``), and the partial result is
kept as ``result_partial.json``. ``--set KEY=VALUE`` runs a candidate configuration (the recipe's
``with_overrides``), exactly as ``sbp_validate.py --set`` validates it.

Run:  chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sbp_run_nets.py \\
          --nets LeNet5-Caffe --out /tmp/sbp_l5 --merge benchmarks/results/sbp_recipe_full.json \\
          [--set sbp_epochs=25]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bdlkit.experiments import sbp
from bdlkit.report import write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", required=True, choices=list(sbp.NETS))
    ap.add_argument("--out", type=Path, required=True, help="output folder (as `bdlkit run --out`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--merge", type=Path, default=None,
                    help="result.json of an earlier run supplying the other networks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one FULL (QUICK with --quick) config entry of the networks "
                         "run (a candidate; the report's config records what ran)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = None
    if args.set:
        base_cfgs = sbp.QUICK if args.quick else sbp.FULL
        try:
            configs = {n: sbp.with_overrides(base_cfgs[n], args.set) for n in args.nets}
        except ValueError as err:
            raise SystemExit(str(err)) from None
    base = json.loads(args.merge.read_text()) if args.merge else None
    target = args.out / "sbp"
    start = time.perf_counter()
    result = sbp.run(target, quick=args.quick, seed=args.seed, nets=args.nets, configs=configs)
    result["wall_time_s"] = time.perf_counter() - start
    result["config"].update({"quick": args.quick, "seed": args.seed, "nets_run": args.nets})
    if base is not None:
        (target / "result_partial.json").write_text(json.dumps(result, indent=2, default=float))
        result = sbp.merge_results(base, result)
        result["config"]["merged_with"] = str(args.merge)
    (target / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"report written to {write_report(args.out)}")


if __name__ == "__main__":
    main()
