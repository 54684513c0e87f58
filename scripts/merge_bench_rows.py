"""Merge ShapesBench rows written by parallel workers into one run folder, then rewrite its
summary.md (with the SDEdit and no-finetune sweeps) and tradeoff.png. Each worker ran
`imagic bench shapes` on its own copy of the run folder (run.json and rows.csv copied in
first, so the recipe check passes and finished cases are skipped), e.g. on disjoint case
ranges with OMP_NUM_THREADS=1:

    python scripts/merge_bench_rows.py docs/bench/shapes-run4 runs/w1 runs/w2

Rows a worker shares with the run folder (its starting copy) are not duplicated; a (case, seed,
method) that two workers both ran is refused, since it would be counted twice."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from imagic.bench.shapes import FIELDS, eta_table, plot, read_rows, summary
from imagic.images import write_text_atomic


def main(run: Path, workers: list[Path]) -> int:
    record = json.loads((run / "run.json").read_text())
    for w in workers:
        if json.loads((w / "run.json").read_text()) != record:
            sys.exit(f"{w}/run.json is another recipe than {run}/run.json")
    with (run / "rows.csv").open() as f:
        merged = list(csv.DictReader(f))

    def key(r):
        return r["case"], r["seed"], r["method"], r["param"]

    start = {key(r) for r in merged}  # the run as the workers copied it
    added: set[tuple] = set()
    for w in workers:
        with (w / "rows.csv").open() as f:
            new = [r for r in csv.DictReader(f) if key(r) not in start]
        clash = {key(r) for r in new} & added
        if clash:
            case, seed, method, _ = sorted(clash)[0]
            sys.exit(f"{w} repeats case {case}, seed {seed} ({method}) of another worker")
        merged += new
        added |= {key(r) for r in new}
        print(f"{w}: {len(new)} new rows")
    tmp = run / "rows.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(merged)
    tmp.replace(run / "rows.csv")
    rows = read_rows(run / "rows.csv")
    # the benchmark's summary, then the SDEdit and no-finetune sweeps, which RESULTS.md quotes
    write_text_atomic(summary(rows) + "\n" + eta_table(rows, "sdedit") + "\n\n"
                      + eta_table(rows, "no-finetune") + "\n", run / "summary.md")
    plot(rows, run / "tradeoff.png")
    print(f"{run}: {len(rows)} rows; summary.md and tradeoff.png rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
