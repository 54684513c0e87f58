"""Compare η-choosing rules offline on a ShapesBench rows.csv that holds auto-η's signals
(`imagic bench shapes --methods imagic,imagic-auto`): per (case, seed), each rule sees only the
margin and distance of every η in the --eta auto sweep; the detectors' verdicts judge the pick.

    python scripts/auto_eta_rules.py runs/bench-auto-heldout/rows.csv
    python scripts/auto_eta_rules.py --rewrite docs/bench/shapes-run3/rows.csv
    python scripts/auto_eta_rules.py docs/bench/shapes-run4/rows.csv \
        --select 1:24-29,52-79 --select 2:0-79

--select SEED:CASES (repeatable) scores only those (case, seed) pairs, e.g. the ones a rule had
not seen when it was fixed.

--rewrite re-chooses the file's imagic-auto rows with the shipped rule (from the stored signals,
no model needed), for runs whose early rows were picked by a rule shipped before.

Rules:
- shipped: imagic.auto_eta.choose, "jump" since 2026-11-27: the later of the earliest rule's η
  and the η at the largest step up of 1 − SSIM (fixed before ShapesBench run 4's seed 2 existed
  as the candidate, it won on those fresh pairs: docs/RESULTS.md, "Automatic η");
- earliest: the rule shipped before it, the smallest η reaching FRACTION of the alignment gain;
- closest: the rule shipped before, the η closest to the input (smallest 1 − SSIM) among those
  reaching FRACTION of the gain;
- fixed η: one η for every case (the best one is chosen knowing the answers);
- oracle: the best η per (case, seed), knowing the answers.
"""

from __future__ import annotations

import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

from imagic.auto_eta import AUTO_ETAS, FRACTION, choose
from imagic.bench.shapes import FIELDS, KINDS, choose_auto, read_rows, summary
from imagic.images import write_text_atomic


def _reaching(margins):
    """Indices of the η whose margin reaches FRACTION of the sweep's alignment gain."""
    low = min(margins)
    best = max(m - low for m in margins)
    return [i for i, m in enumerate(margins) if m - low >= FRACTION * best]


def closest(etas, margins, distances):
    return etas[min(_reaching(margins), key=lambda i: (distances[i], etas[i]))]


def earliest(etas, margins, distances):
    return etas[min(_reaching(margins))]


RULES = (("shipped", choose), ("earliest", earliest), ("closest", closest))


def parse_select(text: str) -> set[tuple[int, int]]:
    """'1:24-29,52-79' -> {(24, 1), …, (79, 1)} (argparse type of --select)."""
    import argparse

    try:
        seed, colon, spans = text.partition(":")
        pairs = set()
        for span in spans.split(","):
            low, _, high = span.partition("-")
            low, high = int(low), int(high or low)
            if not colon or low > high or low < 0:
                raise ValueError
            pairs |= {(case, int(seed)) for case in range(low, high + 1)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SEED:CASES, e.g. 1:24-29,52-79") from None
    return pairs


def main(path: str, select: set[tuple[int, int]] | None = None) -> int:
    every = [r for r in read_rows(Path(path))
             if select is None or (r["case"], r["seed"]) in select]
    if select is not None:
        found = {(r["case"], r["seed"]) for r in every}
        print(f"--select: {len(found)} of the {len(select)} (case, seed) pairs asked for are in "
              f"{path}")
        if not found:
            sys.exit("nothing to score")
    rows = [r for r in every if r["method"] == "imagic"
            and r["param"] in AUTO_ETAS and r["margin"] is not None]
    picked = {(r["case"], r["seed"]): r["param"] for r in every if r["method"] == "imagic-auto"}
    agree = 0
    sweeps = defaultdict(dict)
    for r in rows:
        sweeps[(r["case"], r["seed"])][r["param"]] = r
    results = defaultdict(lambda: defaultdict(list))  # kind -> rule -> successes
    for sweep in sweeps.values():
        kind = next(iter(sweep.values()))["kind"]
        etas = sorted(sweep)
        margins = [sweep[e]["margin"] for e in etas]
        distances = [sweep[e]["distance"] for e in etas]
        key = (sweep[etas[0]]["case"], sweep[etas[0]]["seed"])
        agree += picked.get(key) == choose(etas, margins, distances)
        for name, rule in RULES:
            success = sweep[rule(etas, margins, distances)]["success"]
            for group in (kind, "all"):
                results[group][name].append(success)
        for group in (kind, "all"):
            results[group]["oracle"].append(max(r["success"] for r in sweep.values()))
            for eta in etas:
                results[group][f"eta {eta:g}"].append(sweep[eta]["success"])
    print(f"{path}: {len(sweeps)} (case, seed) pairs, η sweep {', '.join(map(str, AUTO_ETAS))}; "
          f"the shipped rule re-applied here agrees with the run's imagic-auto rows on "
          f"{agree} of {len(sweeps)}")
    print("| kind | shipped rule (jump) | earliest (before) | closest (before that) "
          "| best fixed η | oracle | shipped / oracle | earliest / oracle | n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for group in ("all", *KINDS):
        res = results.get(group)
        if not res:
            continue

        def rate(name, res=res):
            return sum(res[name]) / len(res[name])

        fixed = max((k for k in res if k.startswith("eta ")), key=rate)
        def ratio(name, res=res):
            return rate(name) / rate("oracle") if rate("oracle") else float("nan")

        print(f"| {group} | {100 * rate('shipped'):.1f}% | {100 * rate('earliest'):.1f}% | "
              f"{100 * rate('closest'):.1f}% | {100 * rate(fixed):.1f}% ({fixed}) | "
              f"{100 * rate('oracle'):.1f}% | {ratio('shipped'):.2f} | {ratio('earliest'):.2f} | "
              f"{len(res['oracle'])} |")
    return 0


def rewrite(path: str) -> int:
    """Replace every imagic-auto row by the imagic row of the η the shipped rule picks."""
    path = Path(path)
    read_rows(path)  # checks the file
    with path.open(newline="") as f:
        raw = list(csv.DictReader(f))
    if raw and "margin" not in raw[0]:
        sys.exit(f"{path} has no auto-η signals (margin, distance): nothing to re-choose from")
    sweeps = defaultdict(dict)  # (case, seed) -> η -> the imagic row with its signals
    for r in raw:
        if r["method"] == "imagic" and r["margin"] != "":
            sweeps[(r["case"], r["seed"])][float(r["param"])] = r
    changed = 0
    for i, r in enumerate(raw):
        if r["method"] != "imagic-auto":
            continue
        sweep = sweeps[(r["case"], r["seed"])]
        if not sweep:
            sys.exit(f"{path}: case {r['case']} seed {r['seed']} has no imagic rows with signals")
        etas = sorted(sweep)
        eta = choose_auto(etas, [float(sweep[e]["margin"]) for e in etas],
                          [float(sweep[e]["distance"]) for e in etas])
        new = {**sweep[eta], "method": "imagic-auto"}
        changed += new != r
        raw[i] = new
    text = io.StringIO()  # written as the benchmark writes it (csv.DictWriter, default dialect)
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(raw)
    write_text_atomic(text.getvalue(), path)
    rows = read_rows(path)
    write_text_atomic(summary(rows), path.parent / "summary.md")
    print(f"{path}: {changed} imagic-auto rows re-chosen by the shipped rule; "
          f"{path.parent / 'summary.md'} rewritten")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rewrite":
        sys.exit(rewrite(sys.argv[2]))
    import argparse
    parser = argparse.ArgumentParser(usage="python scripts/auto_eta_rules.py [--rewrite] ROWS.csv "
                                           "[--select SEED:CASES ...]")
    parser.add_argument("rows")
    parser.add_argument("--select", action="append", type=parse_select,
                        help="SEED:CASES, e.g. 1:24-29,52-79 (repeatable): score only these pairs")
    args = parser.parse_args()
    sys.exit(main(args.rows, set().union(*args.select) if args.select else None))
