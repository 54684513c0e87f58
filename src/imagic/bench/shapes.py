"""ShapesBench: Imagic against its ablations and SDEdit on ShapesWorld, scored analytically.

Each case is an input render and a target caption that differs in exactly one attribute
(colour, size, shape or position). Every output is read back by the detectors: it succeeds when
the target attribute reads as asked and the other three read as in the input; background
fidelity is PSNR and SSIM outside both objects. ShapesBench 2 (`bench/shapes2.py`) brings
cases of ShapesWorld 2 to the same runner. Methods, all from the same seeds:

- imagic: stages 1–2 once per (case, seed), then every η of the sweep (paper §3), stage 3
  started where the recipe says (ShapesBench: fresh noise, the paper's; ShapesBench 2: the
  preset's own start); the ablations start there too;
- imagic-inversion (only when asked for with --methods, on a recipe that starts from noise):
  the same stages 1–2, stage 3 started from the input's DDIM inversion under θ' and e_opt
  (`start="inversion"`, not in the paper; DDIM only), every η;
- imagic-auto: the η that `--eta auto` picks from that sweep (:mod:`imagic.auto_eta`), scored
  like the others; compared with the oracle (the best η per case, knowing the answer);
- no-finetune: the paper's ablation without stage 2 (ē(η) on the original model);
- no-embedding: the ablation without stage 1 (fine-tune on e_tgt, sample at e_tgt);
- sdedit: noise the input to strength s and denoise with the target text (Meng et al. 2022);
  a cascade's super-resolution stages then start where Imagic's do (the recipe's start);
- text-only: the target caption alone (the alignment ceiling and the fidelity floor);
- no-sr-finetune (cascades): Imagic with the super-resolution stages left as trained, only the
  base's delta applied, every η.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..auto_eta import AUTO_ETAS, choose, choose_etas
from ..backends.base import Delta
from ..editor import Imagic, check_sample_steps
from ..errors import InputError
from ..forgetting import STRATEGIES, candidates
from ..images import write_text_atomic
from ..presets import EditConfig
from ..shapes.evaluate import check_edit
from ..shapes.world import (
    COLOURS,
    EXAMPLES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption,
    parse_caption,
    render,
    sample_scene,
)
from . import append_rows, check_same_run, read_rows_csv, save_figure

KINDS = ("colour", "size", "shape", "position")
CHOICES = {"colour": COLOURS, "size": SIZES, "shape": SHAPES, "position": POSITIONS}
ETAS = tuple(round(0.1 * i, 1) for i in range(13))  # 0, 0.1, ..., 1.2
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("imagic", "imagic-auto", "no-finetune", "no-embedding", "sdedit", "text-only")
# ShapesBench's protocol guidance, for every method: the model's training default (the `shapes`
# preset edits at its own, lower, guidance from the inversion; `--guidance` changes it).
GUIDANCE = 4.0
# on request (--methods), so the runs made before it resume without re-fitting every case;
# imagic-vp, imagic-attention and forget-STRATEGY re-render Imagic's session with Forgedit's
# vector projection, AID's attention interpolation or forgetting (the η sweep of `imagic`)
# imagic-auto-forget: auto-η's pick of (η, strategy) among the sweeps of forget "auto"
OPTIONAL_METHODS = ("imagic-inversion", "no-sr-finetune", "imagic-vp", "imagic-attention",
                    "imagic-auto-forget",
                    *(f"forget-{name}" for name in STRATEGIES if name != "none"))
FIELDS = ("case", "kind", "method", "param", "seed", "success", "target", "kept", "pebbles",
          "psnr", "ssim", "status", "text", "margin", "distance", "forget")
# How outputs are scored; a folder scored another way is not resumed. 2: pebbles kept means the
# input's pebbles found within 1.5 px and no new ones (1: mean error < 25/255 on their pixels).
SCORER = 2
# margin, distance: auto-η's two signals for this output (imagic rows when imagic-auto runs, and
# forget-STRATEGY rows when imagic-auto-forget does):
# D(y, e_opt) − D(y, e_tgt) under the base model, and 1 − SSIM to the input; forget: the
# strategy imagic-auto-forget picked (its row only)


def kinds_of(rows) -> list[str]:
    """The edit kinds in the rows, in the order cases cycle through them."""
    return list(dict.fromkeys(r["kind"] for r in sorted(rows, key=lambda r: r["case"])))


@dataclass(frozen=True)
class Case:
    index: int
    kind: str
    source: Scene  # the input, a render (never a model sample)
    target: dict  # the one attribute the text changes, e.g. {"colour": "blue"}

    @property
    def text(self) -> str:
        return caption({**self.source.attributes, **self.target})

    def image(self) -> Image.Image:
        return Image.fromarray(render(self.source))

    fields = FIELDS  # rows.csv's columns for this world's cases

    def check(self, image: Image.Image) -> dict:
        """The scores of one output, as rows.csv holds them."""
        c = check_edit(image, self.source, self.target)
        return {"success": int(c["target"] and c["kept"]), "target": int(c["target"]),
                "kept": int(c["kept"]), "pebbles": int(c["pebbles"]),
                "psnr": round(c["background_psnr"], 3), "ssim": round(c["background_ssim"], 4),
                "status": c["status"]}


def make_cases(count: int = 80, seed: int = 0) -> list[Case]:
    """`count` cases, the four kinds in turn, each from its own seed (so the first N cases of a
    larger set are the N cases of a smaller one)."""
    cases = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng)
        options = [v for v in CHOICES[kind] if v != scene.attributes[kind]]
        new = options[int(rng.integers(len(options)))]
        if kind == "position":  # the same draws again, with pebbles clear of the new place too
            scene = sample_scene(np.random.default_rng([seed, index]), avoid_positions=[new])
        cases.append(Case(index, kind, scene, {kind: new}))
    return cases


def select_cases(end: int, start: int = 0) -> list[Case]:
    """Cases start … end − 1 of the benchmark's fixed list."""
    if end < 1:
        raise InputError(f"--cases must be at least 1, got {end}")
    if not 0 <= start < end:
        raise InputError(f"--from-case must lie in [0, --cases), got {start}")
    return make_cases(end)[start:]


def check_settings(config: EditConfig, etas=ETAS, strengths=STRENGTHS, methods=METHODS,
                   guidances: tuple[float, ...] = ()) -> None:
    """Refuse, before any model loads, what a run could not do: an η or guidance the recipe
    refuses, a strength outside (0, 1], an unknown method, the inversion start without DDIM."""
    known = METHODS + OPTIONAL_METHODS
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise InputError(f"unknown method {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(known)}")
    replace(config, etas=tuple(etas))  # the recipe's own checks of every η
    for g in guidances:
        replace(config, guidance=g)
    if not strengths or not all(0 < s <= 1 for s in strengths):
        raise InputError(f"SDEdit strengths lie in (0, 1], got {list(strengths)}")
    if "imagic-auto-forget" in methods and config.forget != "none":
        raise InputError("imagic-auto-forget picks among forgetting strategies against Imagic "
                         "without forgetting: drop --forget")
    if "imagic-inversion" in methods and config.sampler != "ddim":
        raise InputError("imagic-inversion runs DDIM backwards from the input, so it samples "
                         "with ddim; drop it from --methods or use --sampler ddim")
    if "imagic-inversion" in methods and config.start == "inversion":
        raise InputError("imagic-inversion is Imagic started from the input's inversion, which "
                         "is what imagic does with this recipe: drop it from --methods (or "
                         "--start noise)")


def method_names(methods, guidances: tuple[float, ...]) -> list[str]:
    """The methods' names in rows.csv: as they are with one guidance scale, `METHOD-gG` for
    each scale G with several."""
    if len(guidances) <= 1:
        return list(methods)
    return [f"{m}-g{g:g}" for g in guidances for m in methods]


def score(case, method: str, param: float, seed: int, image: Image.Image) -> dict:
    return {"case": case.index, "kind": case.kind, "method": method, "param": param,
            "seed": seed, **case.check(image), "text": case.text}


def choose_auto(etas, margins, distances) -> float:
    """The η `--eta auto` would pick from a benchmark's sweep: the rule applied to the η that
    `--eta auto` sweeps (AUTO_ETAS), or to every η when the sweep has none of them."""
    swept = [i for i, eta in enumerate(etas) if eta in AUTO_ETAS] or list(range(len(etas)))
    return choose([etas[i] for i in swept], [margins[i] for i in swept],
                  [distances[i] for i in swept])


def run_case(backend, case, seed: int, config: EditConfig, etas, strengths,
             methods=METHODS, guidances: tuple[float, ...] = ()) -> list[dict]:
    """The chosen methods on one (case, seed), at the config's guidance or at each of
    `guidances` (stages 1–2 fitted once for all of them)."""
    image, text = case.image(), case.text
    config = replace(config, seed=seed, etas=tuple(etas), seeds=(seed,))
    scales = guidances or (config.guidance,)
    rows = []
    # Imagic, auto-η, the inversion start and the ablations without (some) fine-tuning share
    # stages 1–2
    if any(m in ("imagic", "imagic-auto", "imagic-inversion", "no-finetune", "no-sr-finetune",
                 "imagic-vp", "imagic-attention", "imagic-auto-forget")
           or m.startswith("forget-") for m in methods):
        editor = Imagic(backend, config, quiet=True)
        session = editor.fit(image, text)
    # The ablation without embedding optimization: e_opt = e_tgt, so every η is the same image
    if "no-embedding" in methods:
        plain = Imagic(backend, replace(config, embed_steps=0, etas=(1.0,)), quiet=True)
        plain_session = plain.fit(image, text)
    x0 = backend.encode_image(image)
    cond, uncond = backend.encode_text([text]), backend.encode_text([""])
    # a cascade's super-resolution stages start where Imagic's do, so the methods differ in the
    # base alone
    stage_start = image if config.start == "inversion" else None
    for guidance in scales:
        def name(method, guidance=guidance):
            return method_names([method], guidances)[scales.index(guidance)]

        sweeps: dict[str, list] = {}  # strategy -> Imagic's sweep with it, rendered once

        def sweep(strategy: str, guidance=guidance, sweeps=sweeps) -> list:
            if strategy not in sweeps:
                sweeps[strategy] = editor.generate(session, guidance=guidance, forget=strategy)
            return sweeps[strategy]

        if {"imagic", "imagic-auto"} & set(methods):
            results = sweep(config.forget)
            imagic_rows = [score(case, name("imagic"), r.eta, seed, r.image) for r in results]
            if "imagic-auto" in methods:
                # the signals of every output, then the choice among the η `--eta auto` sweeps
                signals = choose_etas(backend, session, results)[seed]
                for row, margin, distance in zip(imagic_rows, signals.margins,
                                                 signals.distances):
                    row.update(margin=round(margin, 8), distance=round(distance, 6))
                eta = choose_auto(signals.etas, signals.margins, signals.distances)
                auto_row = {**next(r for r in imagic_rows if r["param"] == eta),
                            "method": name("imagic-auto")}
            if "imagic" in methods:
                rows += imagic_rows
            if "imagic-auto" in methods:
                rows.append(auto_row)
        if "imagic-inversion" in methods:
            rows += [score(case, name("imagic-inversion"), r.eta, seed, r.image)
                     for r in editor.generate(session, guidance=guidance, start="inversion")]
        for method in (m for m in methods if m in ("imagic-vp", "imagic-attention")):
            rows += [score(case, name(method), r.eta, seed, r.image) for r in editor.generate(
                session, guidance=guidance, interpolation=method.removeprefix("imagic-"))]
        for method in (m for m in methods if m.startswith("forget-")):
            rows += [score(case, name(method), r.eta, seed, r.image)
                     for r in sweep(method.removeprefix("forget-"))]
        if "imagic-auto-forget" in methods:  # the pick among forget "auto"'s sweeps
            every = [r for strategy in candidates(session.delta) for r in sweep(strategy)]
            swept = [r for r in every if r.eta in AUTO_ETAS] or every
            choice = choose_etas(backend, session, swept)[seed]
            chosen = next(r for r in swept if r.eta == choice.eta and r.forget == choice.forget)
            for signals in (choice, *choice.others):  # each strategy's signals on its rows
                method = name("imagic" if signals.forget == "none" else f"forget-{signals.forget}")
                by_eta = dict(zip(signals.etas, zip(signals.margins, signals.distances)))
                for row in rows:
                    if row["method"] == method and row["param"] in by_eta:
                        margin, distance = by_eta[row["param"]]
                        row.update(margin=round(margin, 8), distance=round(distance, 6))
            rows.append({**score(case, name("imagic-auto-forget"), choice.eta, seed,
                                 chosen.image), "forget": choice.forget})
        if "no-finetune" in methods:
            untuned = replace(session,
                              delta=Delta(session.delta.kind, {}, session.delta.lora_rank))
            rows += [score(case, name("no-finetune"), r.eta, seed, r.image)
                     for r in editor.generate(untuned, guidance=guidance)]
        if "no-sr-finetune" in methods:  # the base's delta only ("STAGE/…" tensors dropped)
            base_only = {k: v for k, v in session.delta.tensors.items() if "/" not in k}
            untuned = replace(session, delta=Delta(session.delta.kind, base_only,
                                                   session.delta.lora_rank))
            rows += [score(case, name("no-sr-finetune"), r.eta, seed, r.image)
                     for r in editor.generate(untuned, guidance=guidance)]
        if "no-embedding" in methods:
            rows += [score(case, name("no-embedding"), 1.0, seed, r.image)
                     for r in plain.generate(plain_session, guidance=guidance)]
        # SDEdit at each strength, and the text alone, on the original model
        for strength in strengths if "sdedit" in methods else ():
            out = backend.sample(cond, uncond, [torch.Generator().manual_seed(seed)],
                                 config.sample_steps, guidance, x0=x0, strength=strength,
                                 sampler=config.sampler, stage_start=stage_start)
            rows.append(score(case, name("sdedit"), strength, seed, out[0]))
        if "text-only" in methods:
            out = backend.sample(cond, uncond, [torch.Generator().manual_seed(seed)],
                                 config.sample_steps, guidance, sampler=config.sampler)
            rows.append(score(case, name("text-only"), 0.0, seed, out[0]))
    return rows


def run(backend, out: Path, cases: list, seeds, config: EditConfig, etas=ETAS,
        strengths=STRENGTHS, methods=METHODS, quiet: bool = False,
        guidances: tuple[float, ...] = ()) -> Path:
    """Run every (case, seed) not yet in OUT/rows.csv, appending as each finishes (resumable),
    then write the summary and the plot, also of a run stopped part way (Ctrl-C). With several
    `guidances`, every method samples at each (rows named METHOD-gG). Returns the CSV's path."""
    guidances = tuple(dict.fromkeys(guidances))
    if len(guidances) == 1:
        config, guidances = replace(config, guidance=guidances[0]), ()
    check_settings(config, etas, strengths, methods, guidances)
    check_sample_steps(backend, config.sample_steps, config.sampler)
    if "no-sr-finetune" in methods and not backend.auxiliary_stages:
        raise InputError("no-sr-finetune leaves a cascade's super-resolution stages as trained; "
                         "this model has none: drop it from --methods")
    out.mkdir(parents=True, exist_ok=True)
    recipe = replace(config, etas=(1.0,), seeds=(0,))  # as run_case runs it
    settings = {"scorer": SCORER, "etas": list(etas), "strengths": list(strengths),
                "config": recipe.to_dict()}
    if guidances:
        settings["guidances"] = list(guidances)
    check_same_run(out, settings, backend)
    path = out / "rows.csv"
    done = defaultdict(set)  # (case, seed) -> the methods already in the file
    for r in read_rows(path):
        done[(r["case"], r["seed"])].add(r["method"])
    jobs = [(c, s, missing) for c in cases for s in dict.fromkeys(seeds)
            if (missing := tuple(m for m in methods
                                 if not set(method_names([m], guidances)) <= done[(c.index, s)]))]
    try:
        with append_rows(path, cases[0].fields) as commit:
            for case, seed, missing in tqdm(jobs, desc="ShapesBench", unit="case",
                                            disable=quiet):
                commit(run_case(backend, case, seed, config, etas, strengths, missing,
                                guidances))
    finally:  # stopped or not, summarise the rows that are there
        if rows := read_rows(path):
            write_text_atomic(summary(rows), out / "summary.md")
            plot(rows, out / "tradeoff.png")
            if any(r["method"] in STAGE3_VARIANTS for r in rows):
                stage3_plot(rows, out / "stage3.png")
    return path


def read_rows(path: Path) -> list[dict]:
    def convert(r: dict) -> None:
        for key in ("success", "target", "kept", "pebbles", "case", "seed"):
            r[key] = int(r[key])
        if "identity" in r:  # ShapesBench 2's rows
            r["identity"] = int(r["identity"])
        for key in ("param", "psnr", "ssim"):
            r[key] = float(r[key])
        for key in ("margin", "distance"):  # absent in files of older runs
            r[key] = float(r[key]) if r.get(key) else None
        r["method"] = str(r["method"])

    return read_rows_csv(path, convert, "ShapesBench")


def param_curves(rows) -> dict:
    """(kind, method) → {param: (success rate, mean PSNR, mean SSIM, n, pebbles-kept rate,
    identity-kept rate or None for ShapesBench's rows)}."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["method"], r["param"])].append(r)
    curves: dict = defaultdict(dict)
    for (kind, method, param), group in groups.items():
        curves[(kind, method)][param] = (
            float(np.mean([g["success"] for g in group])),
            float(np.mean([g["psnr"] for g in group])),
            float(np.mean([g["ssim"] for g in group])),
            len(group),
            float(np.mean([g["pebbles"] for g in group])),
            float(np.mean([g["identity"] for g in group])) if "identity" in group[0] else None,
        )
    return curves


def eta_table(rows, method: str = "imagic") -> str:
    """Along η, over every kind: how often the target is read, the other attributes kept, both,
    the pebbles kept, and the background's SSIM and PSNR (the paper's trade-off, analytically)."""
    by_eta = defaultdict(list)
    for r in rows:
        if r["method"] == method:
            by_eta[r["param"]].append(r)
    if not by_eta:
        return ""
    etas = sorted(by_eta)

    def line(name, values):
        return f"| {name} | " + " | ".join(values) + " |"

    def rate(key):
        return [f"{100 * np.mean([r[key] for r in by_eta[e]]):.0f}%" for e in etas]

    param = "strength" if method == "sdedit" else "η"
    world2 = "identity" in rows[0]  # ShapesBench 2: success also needs every identity kept
    return "\n".join([
        f"{method} along {param}, all kinds ({len(by_eta[etas[0]])} outputs per column).", "",
        line(param, [f"{e:g}" for e in etas]),
        line("---", ["---"] * len(etas)),
        line("target attribute read", rate("target")),
        line("other attributes kept", rate("kept")),
        *([line("identity kept", rate("identity"))] if world2 else []),
        line("success (all three)" if world2 else "success (both)", rate("success")),
        line("pebbles kept", rate("pebbles")),
        line("background SSIM", [f"{np.mean([r['ssim'] for r in by_eta[e]]):.3f}" for e in etas]),
        line("background PSNR (dB)",
             [f"{np.mean([r['psnr'] for r in by_eta[e]]):.1f}" for e in etas]),
    ])


def summary(rows) -> str:
    """Per edit kind and method: the best parameter (η or strength) by success, its success
    rate and background fidelity."""
    curves = param_curves(rows)
    cases = len({r["case"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    world2 = "identity" in rows[0]
    lines = [f"# ShapesBench{' 2' if world2 else ''}: {cases} cases × {seeds} seeds", "",
             "Best parameter per method (η for imagic, its variants and no-finetune, "
             "strength for sdedit); ± is the binomial standard error over its outputs.", "",
             "| kind | method | best param | success | background PSNR (dB) | SSIM | pebbles kept "
             f"|{' identity kept |' if world2 else ''} outputs |",
             f"| --- | --- | --- | --- | --- | --- | --- |{' --- |' if world2 else ''} --- |"]
    present = dict.fromkeys(r["method"] for r in rows)
    bases = ("imagic", "imagic-inversion", "imagic-vp", "imagic-attention",
             *(m for m in OPTIONAL_METHODS if m.startswith("forget-")), "no-finetune",
             "no-sr-finetune", "no-embedding", "sdedit", "text-only")
    methods = [m for base in bases for m in present if m == base or m.startswith(f"{base}-g")]
    for kind in kinds_of(rows):
        for method in methods:
            curve = curves.get((kind, method))
            if not curve:
                continue
            param, (success, psnr, ssim, n, pebbles, identity) = max(
                curve.items(), key=lambda kv: (kv[1][0], kv[1][1]))
            error = 100 * math.sqrt(success * (1 - success) / n)
            kept = f" {100 * identity:.0f}% |" if world2 else ""
            lines.append(f"| {kind} | {method} | {param:g} | {100 * success:.1f}% ± {error:.1f} | "
                         f"{psnr:.2f} | {ssim:.3f} | {100 * pebbles:.0f}% |{kept} {n} |")
    for method in methods:  # along η: Imagic, and each guidance scale's Imagic
        if method == "imagic" or method.startswith(("imagic-g", "imagic-inversion-g")):
            lines += ["", eta_table(rows, method)]
    if any(r["method"] == "imagic-auto" for r in rows):
        lines += ["", auto_eta_table(rows)]
    if any(r["method"] == "imagic-auto-forget" for r in rows):
        lines += ["", auto_forget_table(rows)]
    return "\n".join(lines) + "\n"


def auto_forget_comparison(rows) -> dict:
    """Per edit kind and overall, over the (case, seed) pairs with an imagic-auto-forget row:
    the success of its pick, of the oracle over every (η, strategy) swept (the best output per
    case), of auto-η without forgetting and of the oracle over η alone; and the background
    PSNR of the two picks, and how often each strategy was picked."""
    strategies = {"imagic": "none", **{f"forget-{s}": s for s in STRATEGIES}}
    picks = {(r["case"], r["seed"]): r for r in rows if r["method"] == "imagic-auto-forget"}
    plain = {(r["case"], r["seed"]): r for r in rows if r["method"] == "imagic-auto"}
    swept = defaultdict(list)  # (case, seed) -> [(strategy, success)] over the auto sweep
    for r in rows:
        if r["method"] in strategies and r["param"] in AUTO_ETAS:
            swept[(r["case"], r["seed"])].append((strategies[r["method"]], r["success"]))
    groups = {"all": list(picks), **{kind: [k for k, r in picks.items() if r["kind"] == kind]
                                     for kind in kinds_of(rows)}}
    table = {}
    for name, keys in groups.items():
        keys = [k for k in keys if any(s == "none" for s, _ in swept[k]) and k in plain]
        if not keys:
            continue
        table[name] = {
            "n": len(keys),
            "auto": float(np.mean([picks[k]["success"] for k in keys])),
            "oracle": float(np.mean([max(ok for _, ok in swept[k]) for k in keys])),
            "auto_eta": float(np.mean([plain[k]["success"] for k in keys])),
            "oracle_eta": float(np.mean([max(ok for s, ok in swept[k] if s == "none")
                                         for k in keys])),
            "psnr": float(np.mean([picks[k]["psnr"] for k in keys])),
            "psnr_eta": float(np.mean([plain[k]["psnr"] for k in keys])),
            "picked": dict(sorted(Counter(picks[k]["forget"] for k in keys).items())),
        }
    return table


def auto_forget_table(rows) -> str:
    lines = ["Auto (η, forgetting) against the oracle over every (η, strategy) swept, and auto-η "
             "without forgetting against the oracle over η.", "",
             "| kind | auto (η, forgetting) | oracle | auto / oracle | PSNR (dB) | auto-η | "
             "oracle η | PSNR (dB) | strategies picked | outputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in auto_forget_comparison(rows).items():
        ratio = t["auto"] / t["oracle"] if t["oracle"] else float("nan")
        picked = ", ".join(f"{s} {n}" for s, n in t["picked"].items())
        lines.append(f"| {name} | {100 * t['auto']:.1f}% | {100 * t['oracle']:.1f}% | "
                     f"{ratio:.2f} | {t['psnr']:.2f} | {100 * t['auto_eta']:.1f}% | "
                     f"{100 * t['oracle_eta']:.1f}% | {t['psnr_eta']:.2f} | {picked} | "
                     f"{t['n']} |")
    return "\n".join(lines)


def auto_eta_comparison(rows) -> dict:
    """Per edit kind and overall: success of auto-η, of the best single fixed η (one η for
    every case of the group, chosen knowing the answers) and of the oracle (the best η per
    (case, seed)), over the (case, seed) pairs that have an auto-η row."""
    auto = {(r["case"], r["seed"]): r for r in rows if r["method"] == "imagic-auto"}
    sweep = defaultdict(dict)  # (case, seed) -> {η: success}
    for r in rows:
        if r["method"] == "imagic" and (r["case"], r["seed"]) in auto:
            sweep[(r["case"], r["seed"])][r["param"]] = r["success"]
    groups = {"all": list(auto)}
    for kind in kinds_of(rows):
        groups[kind] = [k for k, r in auto.items() if r["kind"] == kind]
    table = {}
    for name, keys in groups.items():
        keys = [k for k in keys if sweep[k]]
        if not keys:
            continue
        etas = sorted(set.intersection(*(set(sweep[k]) for k in keys)))
        fixed = {eta: float(np.mean([sweep[k][eta] for k in keys])) for eta in etas}
        best_eta = max(fixed, key=fixed.get) if fixed else float("nan")
        table[name] = {
            "n": len(keys),
            "auto": float(np.mean([auto[k]["success"] for k in keys])),
            "oracle": float(np.mean([max(sweep[k].values()) for k in keys])),
            "best_fixed": fixed.get(best_eta, 0.0),
            "best_fixed_eta": best_eta,
            "auto_etas": [auto[k]["param"] for k in keys],
        }
    return table


def auto_eta_table(rows) -> str:
    table = auto_eta_comparison(rows)
    lines = ["Auto-η against the oracle (best η per case and seed) and the best single fixed η.",
             "",
             "| kind | auto-η | best fixed η | oracle | auto / oracle | mean auto η | outputs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in table.items():
        ratio = t["auto"] / t["oracle"] if t["oracle"] else float("nan")
        lines.append(f"| {name} | {100 * t['auto']:.1f}% | {100 * t['best_fixed']:.1f}% "
                     f"(η {t['best_fixed_eta']:g}) | {100 * t['oracle']:.1f}% | {ratio:.2f} | "
                     f"{np.mean(t['auto_etas']):.2f} | {t['n']} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    """Success against background PSNR: along η for imagic, along strength for SDEdit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = param_curves(rows)
    kinds = kinds_of(rows)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    styles = {"imagic": "o-", "imagic-inversion": "v-", "no-finetune": "s--",
              "no-sr-finetune": "P--", "sdedit": "^-", "no-embedding": "D", "text-only": "x"}
    for ax, kind in zip(axes, kinds):
        for method, style in styles.items():
            curve = curves.get((kind, method))
            if not curve:
                continue
            params = sorted(curve)
            ax.plot([curve[p][1] for p in params], [100 * curve[p][0] for p in params], style,
                    label=method)
        ax.set_title(f"{kind} edits")
        ax.set_xlabel("background PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    save_figure(fig, path)


# stage 3's variants on one session: interpolation and forgetting (stage3_plot)
STAGE3_VARIANTS = ("imagic", "imagic-vp", "imagic-attention",
                   *(f"forget-{name}" for name in STRATEGIES if name != "none"))


def stage3_plot(rows, path: Path) -> None:
    """Success and background PSNR along η, over every kind, for each stage 3 variant of
    Imagic's session (interpolation and forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(lambda: defaultdict(list))  # method -> η -> rows
    for r in rows:
        if r["method"] in STAGE3_VARIANTS:
            by[r["method"]][r["param"]].append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in (m for m in STAGE3_VARIANTS if m in by):
        etas = sorted(by[method])
        style = "o-" if method == "imagic" else ("s--" if method.startswith("forget") else "^-")
        left.plot(etas, [100 * np.mean([r["success"] for r in by[method][e]]) for e in etas],
                  style, label=method, markersize=4)
        right.plot(etas, [np.mean([r["psnr"] for r in by[method][e]]) for e in etas], style,
                   label=method, markersize=4)
    left.set_ylabel("success (%)")
    right.set_ylabel("background PSNR (dB)")
    for ax in (left, right):
        ax.set_xlabel("η")
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    save_figure(fig, path)


def merge_runs(run: Path, workers: list[Path]) -> int:
    """Merge the rows of runs made side by side into `run`, then rewrite its summary.md and
    tradeoff.png. Each worker ran `imagic bench shapes` on its own copy of the run folder
    (run.json and rows.csv copied in first, so the recipe check passes and finished cases are
    skipped), e.g. on disjoint case ranges. Rows a worker shares with `run` (its starting copy)
    are not duplicated; an output that two workers both made is refused, since it would be
    counted twice. Returns the number of rows added."""
    record = run / "run.json"
    if not record.is_file():
        raise InputError(f"{run} is not a ShapesBench run folder (no run.json)")
    settings = json.loads(record.read_text())
    for w in workers:
        if not (w / "run.json").is_file() or json.loads((w / "run.json").read_text()) != settings:
            raise InputError(f"{w} is not a run of the same settings as {run} (its run.json "
                             "differs or is missing)")

    def key(r):
        return r["case"], r["seed"], r["method"], r["param"]

    merged = read_rows(run / "rows.csv")
    start = {key(r) for r in merged}  # the run as the workers copied it
    added: set[tuple] = set()
    for w in workers:
        new = [r for r in read_rows(w / "rows.csv") if key(r) not in start]
        clash = {key(r) for r in new} & added
        if clash:
            case, seed, method, _ = sorted(clash)[0]
            raise InputError(f"{w} repeats case {case}, seed {seed} ({method}) of another "
                             "worker")
        merged += new
        added |= {key(r) for r in new}
    buffer = io.StringIO()
    fields = tuple(merged[0]) if merged else FIELDS  # the run's own columns (world 1 or 2)
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in merged)
    write_text_atomic(buffer.getvalue(), run / "rows.csv")
    rows = read_rows(run / "rows.csv")
    write_text_atomic(summary(rows), run / "summary.md")
    plot(rows, run / "tradeoff.png")
    return len(added)


def score_edit(out: Path) -> str:
    """Score an `imagic edit` of one of the shipped example images (examples/, renders of
    known scenes; a ShapesWorld 2 example: `shapes2.score_example`) with the detectors: per
    output, the attributes read, the others kept, the input's pebbles kept and the background
    PSNR; then the counts."""
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        image, text, images = manifest["image"], manifest["text"], manifest["images"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{out} is not the output folder of `imagic edit` (no readable "
                         "manifest.json naming its image)") from None
    name = Path(image).stem
    entries = [e for e in images if not e.get("auto")]  # auto-η copies one of them
    from ..shapes2.world import EXAMPLES as EXAMPLES2

    if name in EXAMPLES2:  # a ShapesWorld 2 example, scored by that world's detectors
        from .shapes2 import score_example

        return score_example(out, name, text, entries)
    if name not in EXAMPLES:
        raise InputError(f"{image} is not one of the shipped examples "
                         f"({', '.join(sorted(EXAMPLES | EXAMPLES2))})")
    source = sample_scene(EXAMPLES[name][0], **EXAMPLES[name][1])
    asked = {k: v for k, v in parse_caption(text).items() if v is not None}
    target = {k: v for k, v in asked.items() if v != source.attributes[k]}
    lines = [f"{name}: {text!r} asks for {target}"]
    counts = {"target": 0, "target_and_kept": 0, "all_and_pebbles": 0}
    for entry in entries:
        with Image.open(out / entry["file"]) as picture:
            c = check_edit(picture.convert("RGB"), source, target)
        counts["target"] += c["target"]
        counts["target_and_kept"] += c["target"] and c["kept"]
        counts["all_and_pebbles"] += c["target"] and c["kept"] and c["pebbles"]
        lines.append(
            f"  η {entry['eta']:.2f} seed {entry['seed']}: read {c['detected']}; target "
            f"{'yes' if c['target'] else 'no'}, others kept {'yes' if c['kept'] else 'no'}, "
            f"pebbles {c['pebbles_found']}/{c['pebbles_expected']} kept + "
            f"{c['pebbles_added']} new, background PSNR {c['background_psnr']:.1f} dB")
    n = len(entries)
    lines.append(f"target read {counts['target']}/{n}; with the other attributes kept "
                 f"{counts['target_and_kept']}/{n}; and the pebbles kept too "
                 f"{counts['all_and_pebbles']}/{n}")
    return "\n".join(lines)
