"""The campaign: many seeds through run_net, with progress lines and the report (outcomes per
category, frozen shares, the reasons units are frozen, every non-ok net)."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import numpy as np
import torch

from .checks import failures, run_net
from .configs import CATEGORIES


OUTCOMES = ("ok", "refused", "internal", "wrong", "invalid")


def summary(records: list[dict]) -> str:
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in records)]
    counts = defaultdict(Counter)
    for r in records:
        counts[r["category"]][r["outcome"]] += 1
    outcomes = [o for o in OUTCOMES if o != "invalid" or any(r["outcome"] == "invalid" for r in records)]
    lines = [f"{'category':<12}" + "".join(f"{o:>10}" for o in outcomes) + f"{'total':>8}"
             + f"{'frozen share':>14}{'nets w/ frozen':>16}{'ens. checked':>14}{'stored@2':>10}"]
    for c in cats + ["all"]:
        rs = [r for r in records if c == "all" or r["category"] == c]
        row = Counter(r["outcome"] for r in rs)
        hidden = sum(r["hidden"] or 0 for r in rs)
        frozen = sum(r["frozen_hidden"] or 0 for r in rs)
        with_frozen = sum(1 for r in rs if r["frozen_hidden"])
        with_spec = sum(1 for r in rs if r["hidden"] is not None)
        checked = sum(1 for r in rs if r["ensemble"] in ("ok", "failed"))
        stored = [r["params"]["2"]["stored"] for r in rs if "2" in r["params"]]
        lines.append(f"{c:<12}" + "".join(f"{row[o]:>10}" for o in outcomes) + f"{len(rs):>8}"
                     + f"{(frozen / hidden if hidden else 0):>14.1%}"
                     + f"{f'{with_frozen}/{with_spec}':>16}{f'{checked}/{len(rs)}':>14}"
                     + (f"{np.mean(stored):>10.2f}" if stored else f"{'-':>10}"))
    return "\n".join(lines)


def frozen_reason_table(records: list[dict], top: int = 8) -> str:
    lines = []
    for c in CATEGORIES:
        reasons = Counter()
        for r in records:
            if r["category"] == c:
                for why in r["frozen_reasons"]:
                    reasons[_normalise(why)] += 1
        if reasons:
            lines.append(f"{c}: " + "; ".join(f"{n}x {w}" for w, n in reasons.most_common(top)))
    return "\n".join(lines)


def _normalise(reason: str) -> str:
    import re
    reason = re.sub(r" at \S+ \(.*?\)$", "", reason)
    reason = re.sub(r"\(([a-z_]+[._])*[a-z_]*\d*\)", "", reason)
    return re.sub(r"\[.*?\]", "[...]", reason)[:90]


def run_campaign(args) -> int:
    """Run the nets of the command line's args (see tools/fuzz_nets.py), print the report and
    write the records to args.json."""
    torch.set_num_threads(1)
    import logging
    import warnings
    logging.getLogger("pleas_fx").setLevel(logging.ERROR)
    logging.getLogger("passes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    budgets = [float(b) for b in args.budgets.split(",")]
    records = []
    start = time.perf_counter()
    for i in range(args.n):
        seed = args.seed + i
        rec = run_net(seed, args.only, budgets)
        records.append(rec)
        if args.verbose:
            print(f"seed {seed} {rec['category']}: {rec['outcome']} ({rec['seconds']:.1f}s, ensemble: {rec['ensemble']})")
            print("  config:", json.dumps(rec["config"]))
            for line in failures(rec):
                print("  " + line)
        elif (i + 1) % 50 == 0:
            c = Counter(r["outcome"] for r in records)
            print(f"[{i + 1}/{args.n}] {dict(c)} {time.perf_counter() - start:.0f}s", flush=True)
    wall = time.perf_counter() - start
    print()
    print(summary(records))
    print("\nfrozen share: frozen hidden units / hidden units (groups not fixed by the structure);"
          " ens. checked: nets whose budget-2 output was compared with the ensemble")
    reasons = frozen_reason_table(records)
    if reasons:
        print("\nmost common reasons hidden units are frozen, per category:\n" + reasons)
    lines = [line for r in records for line in failures(r)]
    if lines:
        print(f"\nnon-ok outcomes ({len(lines)} lines):")
        print("\n".join(lines))
    print(f"\n{len(records)} nets in {wall:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_seconds": wall, "records": records}, f, indent=1, default=str)
    return 0
