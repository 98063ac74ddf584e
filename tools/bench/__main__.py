"""``python -m tools.bench [--quick] [--out DIR]``: see tools/bench/__init__.py."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from snapfs.errors import UsageError
from snapfs.units import parse_size
import tools.bench
from tools.bench import goals, plan, plots, report, runner


def main(argv: list[str] | None = None) -> int:
    """Run the bench; write results.json, results.md and PNGs into --out."""
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=tools.bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small target, few rates (< 3 minutes)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory (default bench-results/)")
    p.add_argument("--no-install", action="store_true", help="report missing peers instead of installing them")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                   help="only re-render the report and plots of an earlier run's results.json into --out")
    p.add_argument("--size", metavar="SIZE", help="target size instead of the plan's (e.g. 4G)")
    p.add_argument("--rates", metavar="LIST", help="write rates in pages/s instead of the plan's, e.g. 0,10000,max")
    p.add_argument("--only", metavar="LIST",
                   help="run only these sections (comma-separated): " + ", ".join(runner.SECTIONS)
                   + " (methods = the write-rate sweep of every method, with the floors)")
    p.add_argument("--threads", metavar="LIST", help="writer-thread counts of the matrix, e.g. 1,4,16")
    p.add_argument("--thp", metavar="LIST", help="THP modes of the matrix: off,on")
    p.add_argument("--merge", type=Path, metavar="RESULTS_JSON",
                   help="with --only tree: the other sections from an earlier run's results.json")
    p.add_argument("--docs", type=Path, metavar="DIR",
                   help="also write DIR/performance.md and DIR/performance/*.png from this run")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        results["goals"] = goals.evaluate(results)  # judged by the goals as they are now
        args.out.mkdir(parents=True, exist_ok=True)
        report.write(results, args.out, results.get("command", "python -m tools.bench"))
        pngs = plots.write(results, args.out)
        if args.docs:
            report.write_docs(results, args.docs, pngs)
        print(f"rendered {args.out}/results.md and plots" + (f", {args.docs}/performance.md" if args.docs else ""))
        return 0
    the_plan = plan.quick() if args.quick else plan.full()
    try:
        if args.size:
            the_plan.size = parse_size(args.size)
        if args.rates:
            the_plan.rates = [-1.0 if r.strip() == "max" else float(r) for r in args.rates.split(",")]
        if args.threads:
            the_plan.thread_counts = [int(t) for t in args.threads.split(",")]
        if args.thp:
            the_plan.thp_modes = [{"off": False, "on": True}[t.strip()] for t in args.thp.split(",")]
        only = None
        if args.only:
            only = {x.strip() for x in args.only.split(",")}
            if only - set(runner.SECTIONS):
                raise ValueError(f"unknown sections {sorted(only - set(runner.SECTIONS))}: choose from "
                                 + ", ".join(runner.SECTIONS))
        if args.merge and only != {"tree"}:
            raise ValueError("--merge goes with --only tree")
    except (ValueError, KeyError, UsageError) as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m tools.bench" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = runner.run(the_plan, args.out, install_peers=not args.no_install, only=only)
    if args.merge:
        results = dict(json.loads(args.merge.read_text()),
                       tree=dict(results["tree"] or {}, command=command, loadavg=results["machine"].get("loadavg")))
    results["goals"] = goals.evaluate(results)
    js, md = report.write(results, args.out, command)
    pngs = plots.write(results, args.out)
    if args.docs:
        print(f"wrote {report.write_docs(dict(results, command=command), args.docs, pngs)}")
    print(f"wrote {js}, {md}, " + ", ".join(str(x) for x in pngs))
    for g in results["goals"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[g["pass"]]
        print(f"  {verdict}  {g['goal']}: {g['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
