"""Fuzz pleas_fx.merge with random networks, and report what breaks.

The nets, the checks and the outcomes are described in the package tools/fuzz/ (its
__init__); this is its command line.

    python tools/fuzz_nets.py --n 1000                       # the campaign
    python tools/fuzz_nets.py --seed 17 --n 1 --verbose       # one net again
    python tools/fuzz_nets.py --n 200 --only transformer --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

from fuzz.campaign import run_campaign  # noqa: E402
from fuzz.configs import CATEGORIES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="number of nets")
    p.add_argument("--seed", type=int, default=0, help="first seed (net i has seed SEED + i)")
    p.add_argument("--budgets", default="1,1.5,2", help="comma-separated budgets for the A/B merge")
    p.add_argument("--only", choices=CATEGORIES, help="draw every net from this category")
    p.add_argument("--verbose", action="store_true", help="print each net's config and result")
    p.add_argument("--json", metavar="OUT", help="write all records to this file")
    return run_campaign(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
