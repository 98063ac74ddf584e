"""``python -m tools.torture [--positions N] [--random-kills K] [--case NAME] [--campaign NAME]``:
see tools/torture/__init__.py."""

from __future__ import annotations

import argparse
import json
import sys

import tools.torture
from tools.torture.campaigns import CAMPAIGNS
from tools.torture.core import Budget, Tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.torture", description=tools.torture.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--campaign", action="append", choices=sorted(CAMPAIGNS),
                   help="run only this campaign (repeatable; default: all)")
    p.add_argument("--case", action="append", help="run only this case (repeatable; default: all)")
    p.add_argument("--positions", type=int, default=None,
                   help="fault positions per case (default: every ptrace call); flips or mutations "
                        "per case for the bad-input campaigns (default: the suite's numbers)")
    p.add_argument("--random-kills", type=int, default=5, help="kills at random delays per case")
    p.add_argument("--seconds", type=float, default=None, help="stop starting new runs after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the tally as JSON at the end")
    p.add_argument("--list", action="store_true", help="list the campaigns and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, _) in sorted(CAMPAIGNS.items()):
            print(f"{name}: {what}")
        return 0
    budget = Budget(positions=args.positions, random_kills=args.random_kills, cases=args.case,
                    seconds=args.seconds, seed=args.seed)
    tally = Tally()
    for name in args.campaign or sorted(CAMPAIGNS):
        print(f"== {name}", flush=True)
        CAMPAIGNS[name][1](budget, tally, lambda line: print(line, flush=True))
    for problem in tally.problems:
        print(problem)
    print(tally.summary())
    if args.json:
        print(json.dumps(tally.to_json()))
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
