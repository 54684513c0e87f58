"""One Imagic edit per model family (SDXL, SD3.5, FLUX.1, DeepFloyd IF), timed per stage, with
its peak memory: each family's preset as loading the model picks it, and its low-memory mode
under a 23.5 GiB allocator cap, as on a 24 GB card. docs/PERFORMANCE.md has the results.

    python benchmarks/gpu_families.py --out gpu_families        # a GPU: every family, both modes
    python benchmarks/gpu_families.py --families sdxl --steps 2 --out /tmp/f    # one family
    python benchmarks/gpu_families.py --tiny --device cpu --steps 16 --out /tmp/f   # a CPU

The models have the real architectures with random weights (benchmarks/families/): speed does
not depend on weight values, so nothing is downloaded. Each (family, mode) runs in a process of
its own, so that a cap or an out-of-memory error in one leaves the others alone, and a run that
runs out of memory is recorded as not fitting. In each: a warm-up edit of one step per stage,
then stages 1 and 2 over n and 2n steps (n = --steps), projected to the preset's step counts as
gpu_edit.py projects its reference (the difference gives the cost per step; the rest is counted
once; a pair whose longer run was no slower is timed again once, then recorded as an error that
fails the benchmark); stage 3 is one image at the preset's sampling steps. A cascade's
super-resolution fine-tuning runs as many steps as its base stage here, as in the deepfloyd-if
preset, and is counted in stage 2.

Peak memory is torch.cuda.max_memory_allocated over the whole edit (on the CPU, the process's
peak RSS). OUT/families.json holds every run (device, versions, commit); OUT/FAMILY-MODE.json
each one as its process wrote it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_edit and families/ beside this file

# family: (builder module, builder function, preset, extra builder arguments)
FAMILIES = {
    "sdxl": ("families.sdxl", "random_sdxl", "sdxl", {}),
    "sd3": ("families.sd3", "random_sd3", "sd3", {}),
    "flux": ("families.flux", "random_flux", "flux", {}),
    "deepfloyd-if": ("families.deepfloyd_if", "random_if", "deepfloyd-if", {}),
}
MODES = {"default": None, "24gb": 23.5}  # mode: allocator cap in GiB (None: the whole card)
TEXT = "a photo of a sitting dog"


def build(family: str, device, tiny: bool):
    module, function, preset, extra = FAMILIES[family]
    builder = getattr(importlib.import_module(module), function)
    return builder(device, shape="tiny" if tiny else "real", **extra), preset


def config_for(preset, mode: str, steps: int, sample_steps: int | None = None):
    """The preset (low-memory in the 24 GB mode) with `steps` per training stage, one image."""
    from imagic.presets import low_memory

    config = low_memory(preset) if mode == "24gb" else preset
    return replace(config, embed_steps=steps, finetune_steps=steps, aux_finetune_steps=steps,
                   etas=(1.0,), seeds=(0,),
                   sample_steps=sample_steps or config.sample_steps)


def run_one(family: str, mode: str, steps: int, device_name: str, tiny: bool) -> dict:
    """Build the family's model and time its edit; an out-of-memory error is a result too."""
    import gpu_edit
    import torch

    from imagic.backends import resolve_device
    from imagic.presets import get_preset

    device = resolve_device(device_name)
    cap = MODES[mode] if device.type == "cuda" else None
    if cap is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total),
                                                   device.index or 0)
    result = {"family": family, "mode": mode, "memory_cap_gib": cap, "steps": [steps, 2 * steps]}
    start = time.perf_counter()
    try:
        backend, preset_name = build(family, device, tiny)
        result["build_s"] = round(time.perf_counter() - start, 1)
        preset = get_preset(preset_name)
        result |= {"preset": preset_name, "resolution": backend.output_resolution,
                   "parameters": backend.parameter_counts(),
                   "finetune": config_for(preset, mode, 1).finetune}
        image = gpu_edit.photo(backend.output_resolution)
        gpu_edit.measure(backend, config_for(preset, mode, 1, sample_steps=1), image)  # warm-up
        short, long, problem = gpu_edit.timed_pair(lambda m: gpu_edit.measure(
            backend, config_for(preset, mode, m, sample_steps=None if m > steps else 1), image),
            steps)
    except torch.OutOfMemoryError as error:
        result |= {"fits": False, "error": str(error).splitlines()[0][:300]}
        return result
    if problem:
        return result | {"measured": [short, long], "error": f"{problem}; raise --steps"}
    target = {"stage1": preset.embed_steps, "stage2": preset.finetune_steps}
    result |= {"fits": True, "measured": [short, long],
               "projected": gpu_edit.project(short, long, target),
               "peak_memory_gib": max(short["peak_memory_gib"], long["peak_memory_gib"]),
               "peak_memory_kind": long["peak_memory_kind"]}
    return result


def run_all(args) -> int:
    import torch

    from imagic import __version__
    from imagic.backends import device_name
    from imagic.bench import checkout_commit
    from imagic.session import library_versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    report = {
        "benchmark": "gpu_families", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *(args.argv or [])]),
        "device": device_name(torch.device(device)),
        "versions": {"imagic": __version__, **library_versions()},
        "commit": checkout_commit(), "runs": []}
    failed = 0
    for family in args.families:
        for mode in args.modes:
            path = out / f"{family}-{mode}.json"
            command = [sys.executable, __file__, "--one", family, mode, "--steps",
                       str(args.steps), "--device", device, "--out", str(path),
                       *(["--tiny"] if args.tiny else [])]
            print(f"{family} {mode} ...", flush=True)
            try:
                done = subprocess.run(command, timeout=args.timeout)
                ok = done.returncode == 0 and path.exists()
            except subprocess.TimeoutExpired:
                ok = False
            run = json.loads(path.read_text()) if ok else {
                "family": family, "mode": mode, "error": "the run failed or timed out"}
            failed += not ok or "error" in run and "fits" not in run  # out of memory: a result
            report["runs"].append(run)
            (out / "families.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 1 if failed else 0


def table(report: dict) -> str:
    """The results as docs/PERFORMANCE.md shows them."""
    lines = ["| family | mode | stage 2 | resolution | stage 1 s | stage 2 s | one image s | "
             "edit s | peak GiB |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in report["runs"]:
        cap = run.get("memory_cap_gib")
        mode = "preset" if run["mode"] == "default" else "low-memory" + (
            f", {cap} GiB cap" if cap else "")
        if not run.get("fits"):
            why = "out of memory" if "fits" in run else run.get("error", "")
            lines.append(f"| {run['family']} | {mode} | {run.get('finetune', '')} | "
                         f"{run.get('resolution', '')} | {why} | | | | |")
            continue
        p = run["projected"]
        lines.append(f"| {run['family']} | {mode} | {run['finetune']} | {run['resolution']} | "
                     f"{p['stage1_s']:.0f} | {p['stage2_s']:.0f} | {p['generate_s']:.1f} | "
                     f"{p['total_s']:.0f} | {run['peak_memory_gib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=4,
                        help="n: stages 1-2 are timed over n and 2n steps (default 4)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-ins, for CPUs and tests")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one (family, mode) process may take (default 600)")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="a folder for the JSON results")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.one:
        family, mode = args.one
        result = run_one(family, mode, args.steps, args.device, args.tiny)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
