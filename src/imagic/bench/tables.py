"""The ShapesBench tables docs/RESULTS.md quotes, from one or more rows.csv: the best setting
per method and edit kind; Imagic, SDEdit and no-finetune along their parameter; the SDEdit bar
per kind (all cases, the held-out cases, each seed); and every method's fidelity per seed.
ShapesBench 2's rows also get what each ablation costs, the fine-tuned super-resolution
stage against the stage as trained, and the edit bar (pose, add and remove edits against
SDEdit), with standard errors.
Only (case, seed) pairs that every method in the files finished are counted, so a partial run
compares like with like. `imagic bench tables ROWS.csv ...`."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import InputError
from .shapes import eta_table, kinds_of, param_curves, read_rows, summary

HELD_OUT = 16  # cases 0–15 chose the `shapes` preset's learning rates; the rest did not
NON_RIGID = ("pose", "add", "remove")  # ShapesBench 2's edit bar (issue 19) is on these kinds
BAR_POINTS = 20  # … where Imagic must lead SDEdit by this many points of success


def complete(rows: list[dict]) -> list[dict]:
    """The rows of (case, seed) pairs that every method in the file finished."""
    every = {r["method"] for r in rows}
    methods = defaultdict(set)
    for r in rows:
        methods[(r["case"], r["seed"])].add(r["method"])
    keep = {k for k, m in methods.items() if m == every}
    return [r for r in rows if (r["case"], r["seed"]) in keep]


def best(points: dict) -> tuple[float, tuple] | None:
    """The parameter with the highest success, ties to the higher PSNR."""
    if not points:
        return None
    return max(points.items(), key=lambda kv: (kv[1][0], kv[1][1]))


def cell(prefix: str, item) -> str:
    if item is None:
        return "none"
    param, (success, psnr, *_) = item
    return f"{prefix}{param:g}: {100 * success:.1f}%, {psnr:.2f} dB"


def sdedit_bar(rows: list[dict], label: str, method: str = "imagic") -> list[str]:
    """Per kind: `method` at its best η against SDEdit at its best strength, and SDEdit's best
    among the strengths that keep the background at least as well."""
    name = {"imagic": "Imagic"}.get(method, method)
    lines = [f"SDEdit bar, {label}: {name} at its best η against SDEdit at its best strength, "
             f"and SDEdit's best among the strengths whose PSNR ≥ {name}'s.", "",
             f"| kind | {name}, best η | SDEdit, best strength | SDEdit at ≥ {name}'s PSNR "
             "| success lead at ≥ PSNR | outputs per setting |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_kind = param_curves(rows)  # (kind, method) -> {param: (success, PSNR, SSIM, n, pebbles)}
    for kind in kinds_of(rows):
        imagic, sdedit = best(by_kind.get((kind, method), {})), by_kind.get((kind, "sdedit"))
        if imagic is None or not sdedit:
            continue
        matched = best({s: v for s, v in sdedit.items() if v[1] >= imagic[1][1]})
        lead = (f"{100 * (imagic[1][0] - matched[1][0]):+.1f}" if matched
                else f"{100 * imagic[1][0]:+.1f} (no strength that close)")
        lines.append(f"| {kind} | {cell('η ', imagic)} | {cell('', best(sdedit))} | "
                     f"{cell('', matched)} | {lead} | {imagic[1][3]} |")
    return lines


def seed_table(rows: list[dict]) -> list[str]:
    """Fixed settings of each method, per seed: how much the noise draw moves the scores."""
    seeds = sorted({r["seed"] for r in rows})
    settings = [("imagic", 0.0, "Imagic η 0 (reconstruction)"), ("imagic", 0.7, "Imagic η 0.7"),
                ("imagic", 0.8, "Imagic η 0.8"), ("imagic", 1.0, "Imagic η 1.0"),
                ("no-finetune", 0.8, "no-finetune η 0.8"), ("sdedit", 0.5, "SDEdit 0.5"),
                ("sdedit", 0.8, "SDEdit 0.8"), ("sdedit", 0.9, "SDEdit 0.9"),
                ("text-only", 0.0, "text-only")]
    lines = ["Per seed, on the same cases: success, background PSNR, SSIM.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | spread of PSNR |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- |"]
    for method, param, name in settings:
        cells, psnrs = [], []
        for s in seeds:
            group = [r for r in rows if r["seed"] == s and r["method"] == method
                     and abs(r["param"] - param) < 1e-9]
            if not group:
                cells.append("—")
                continue
            psnr = float(np.mean([r["psnr"] for r in group]))
            psnrs.append(psnr)
            cells.append(f"{100 * np.mean([r['success'] for r in group]):.0f}%, {psnr:.1f} dB, "
                         f"{np.mean([r['ssim'] for r in group]):.3f}")
        spread = f"{max(psnrs) - min(psnrs):.1f} dB" if psnrs else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {spread} |")
    return lines


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over paired outputs, and its standard error (nan with one pair)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else math.nan


def percent(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{100 * value:{'+' if signed else ''}.0f}"


def stage_table(rows: list[dict]) -> list[str]:
    """ShapesBench 2: the super-resolution stage fine-tuned on the input (`imagic`) against the
    stage as trained (`no-sr-finetune`), at each η, on the same outputs of the same fits."""
    by = defaultdict(dict)  # (method, η) → {(case, seed): row}
    for r in rows:
        if r["method"] in ("imagic", "no-sr-finetune"):
            by[(r["method"], r["param"])][(r["case"], r["seed"])] = r
    etas = sorted({p for m, p in by if m == "imagic"} & {p for m, p in by if m != "imagic"})
    if not etas:
        return []
    lines = ["The super-resolution stage fine-tuned on the input (imagic) against the stage as "
             "trained (no-sr-finetune), per η over the same (case, seed) pairs: how often each "
             "keeps every object's identity and every pebble, and the difference in points ± "
             "its paired standard error.", "",
             "| η | identity: fine-tuned | as trained | difference | pebbles: fine-tuned | "
             "as trained | difference | outputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for eta in etas:
        tuned, trained = by[("imagic", eta)], by[("no-sr-finetune", eta)]
        keys = sorted(tuned.keys() & trained.keys())
        cells = []
        for key in ("identity", "pebbles"):
            a, b = [tuned[k][key] for k in keys], [trained[k][key] for k in keys]
            diff, error = paired_difference(a, b)
            cells += [f"{percent(np.mean(a))}%", f"{percent(np.mean(b))}%",
                      f"{percent(diff, True)} ± {percent(error)}"]
        lines.append(f"| {eta:g} | " + " | ".join(cells) + f" | {len(keys)} |")
    return lines


def settings(rows: list[dict]) -> dict[str, dict[float, dict[tuple, dict]]]:
    """method → parameter → {(case, seed): row}; an auto method's η differs per case, so all
    its rows are one setting (parameter nan)."""
    curves = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        auto = r["method"].startswith("imagic-auto")
        curves[r["method"]][math.nan if auto else r["param"]][(r["case"], r["seed"])] = r
    return curves


def best_setting(curve: dict[float, dict[tuple, dict]]) -> float:
    """The parameter with the highest success over its outputs, ties to the higher PSNR (`best`)."""
    return best({param: (np.mean([r["success"] for r in group.values()]),
                         np.mean([r["psnr"] for r in group.values()]))
                 for param, group in curve.items()})[0]


def binomial_error(successes: list[float]) -> float:
    p = float(np.mean(successes))
    return math.sqrt(p * (1 - p) / len(successes))


def edit_bar_table(rows: list[dict]) -> list[str]:
    """ShapesBench 2's edit bar: on pose, add and remove edits, each kind and the three pooled,
    Imagic at its best η against SDEdit at its best strength (each picked on those outputs),
    the lead in points ± its paired standard error, and whether it reaches the bar."""
    lines = [f"The edit bar: on {', '.join(NON_RIGID)} edits, Imagic at its best η against "
             "SDEdit at its best strength, each picked on the outputs of the row: success ± its "
             "binomial standard error, and Imagic's lead in points ± its paired standard error "
             f"(the bar: {BAR_POINTS} points).", "",
             "| edits | Imagic, best η | SDEdit, best strength | lead | lead ≥ "
             f"{BAR_POINTS} points | outputs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, kinds in [*((kind, (kind,)) for kind in NON_RIGID),
                         (" + ".join(NON_RIGID), NON_RIGID)]:
        curves = settings([r for r in rows if r["kind"] in kinds])
        if not curves["imagic"] or not curves["sdedit"]:
            continue
        eta, strength = best_setting(curves["imagic"]), best_setting(curves["sdedit"])
        a, b = curves["imagic"][eta], curves["sdedit"][strength]
        keys = sorted(a.keys() & b.keys())
        ours, theirs = [a[k]["success"] for k in keys], [b[k]["success"] for k in keys]
        lead, error = paired_difference(ours, theirs)
        cells = [f"{param:g}: {percent(np.mean(s))}% ± {percent(binomial_error(s))}"
                 for param, s in ((eta, ours), (strength, theirs))]
        lines.append(f"| {label} | η {cells[0]} | {cells[1]} | {percent(lead, True)} ± "
                     f"{percent(error)} | {'yes' if 100 * lead >= BAR_POINTS else 'no'} | "
                     f"{len(keys)} |")
    return lines


def ablation_table(rows: list[dict]) -> list[str]:
    """Every method at its own best parameter over all kinds against Imagic at its best η:
    what each ablation and baseline costs, with standard errors."""
    curves = settings(rows)
    if "imagic" not in curves:
        return []
    reference = curves["imagic"][best_setting(curves["imagic"])]
    lines = ["Each method at its own best parameter over all kinds (success; ties to PSNR), "
             "against Imagic at its best η on the same (case, seed) pairs: success ± its "
             "binomial standard error, and the difference in points ± its paired standard "
             "error. Each (case, seed) counts as independent, and each best parameter is "
             "picked on the outputs it is scored on, which favours a method with more settings "
             "swept.", "",
             "| method | best param | success | identity kept | pebbles kept | "
             "background PSNR (dB) | success − Imagic's | outputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in curves:
        param = best_setting(curves[method])
        mine = curves[method][param]
        keys = sorted(mine.keys() & reference.keys())
        success = np.mean([mine[k]["success"] for k in keys])
        error = binomial_error([mine[k]["success"] for k in keys])
        diff, diff_error = paired_difference([mine[k]["success"] for k in keys],
                                             [reference[k]["success"] for k in keys])
        lead = "–" if method == "imagic" else f"{percent(diff, True)} ± {percent(diff_error)}"
        lines.append(
            f"| {method} | {'auto' if math.isnan(param) else f'{param:g}'} | "
            f"{percent(success)}% ± {percent(error)} | "
            f"{percent(np.mean([mine[k]['identity'] for k in keys]))}% | "
            f"{percent(np.mean([mine[k]['pebbles'] for k in keys]))}% | "
            f"{np.mean([mine[k]['psnr'] for k in keys]):.2f} | {lead} | {len(keys)} |")
    return lines


def tables(paths: list[Path], seeds: set[int] | None = None) -> str:
    """Every table, in markdown, from the rows of `paths` read together (one run's rows.csv, or
    several, e.g. a method added later in its own folder)."""
    name = " + ".join(map(str, paths))
    every = [r for p in paths for r in read_rows(Path(p)) if seeds is None or r["seed"] in seeds]
    keys = [(r["case"], r["seed"], r["method"], r["param"]) for r in every]
    if len(set(keys)) < len(keys):
        raise InputError(f"{name}: the same output is in more than one row (a file given twice, "
                         "or two runs of one method); give each method's rows once")
    rows = complete(every)
    if not rows:
        raise InputError(f"{name}: no (case, seed) pair with every method's rows"
                         + (f" among seeds {sorted(seeds)}" if seeds else ""))
    pairs = {(r["case"], r["seed"]) for r in rows}
    seeds_found = sorted({s for _, s in pairs})
    out = [f"<!-- {name}: {len(pairs)} complete (case, seed) pairs of {len(every)} rows; "
           f"seeds {', '.join(map(str, seeds_found))} -->", "",
           summary(rows).split("\n", 2)[2],  # the best-setting table and Imagic along η
           eta_table(rows, "sdedit"), "", eta_table(rows, "no-finetune"), "",
           *sdedit_bar(rows, "all cases and seeds"), ""]
    if "identity" in rows[0]:  # ShapesBench 2: its cases are all held out or all tuning
        costs = [*ablation_table(rows), "", *stage_table(rows), "", *edit_bar_table(rows)]
        out += [*(costs if costs[0] else ["(No `imagic` rows, so no ablation or stage table: "
                                          "a run at several guidance scales names them "
                                          "imagic-gG.)"]), ""]
        for s in sorted({r["seed"] for r in rows}):
            out += [*sdedit_bar([r for r in rows if r["seed"] == s], f"seed {s}"), ""]
        return "\n".join(out) + "\n"
    if any(r["method"] == "imagic-inversion" for r in rows):
        out += [eta_table(rows, "imagic-inversion"), "",
                *sdedit_bar(rows, "all cases and seeds", "imagic-inversion"), ""]
    held = [r for r in rows if r["case"] >= HELD_OUT]
    out += [*sdedit_bar(held, f"held-out cases {HELD_OUT}–79, all seeds"), ""]
    for s in seeds_found:
        out += [*sdedit_bar([r for r in rows if r["seed"] == s], f"seed {s}"), ""]
    # per seed on the cases every seed has, so the seeds are compared on the same cases
    cases = set.intersection(*({c for c, s2 in pairs if s2 == s} for s in seeds_found))
    out += [f"({len(cases)} cases that every seed has)", ""]
    out += seed_table([r for r in rows if r["case"] in cases])
    return "\n".join(out) + "\n"
