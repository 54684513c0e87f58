"""One Imagic edit, timed per stage: the way existing implementations run it against imagic's
`fast` preset, in ONE process, through the same engine the CLI uses. The project's one GPU
benchmark; docs/PERFORMANCE.md has its results and how they were run.

    pytest tests/test_gpu.py                                   # first: the CUDA-only tests
    python benchmarks/gpu_edit.py --reference-steps 100 --variants --out gpu_edit.json
    python benchmarks/gpu_edit.py --memory-cap 23.5 --reference-steps 5 --no-low-memory \
        --variants fast+graphs --out gpu_edit-cap23.5.json     # as on a 24 GB card
    python benchmarks/gpu_edit.py --fast-preset quick --variants --out gpu_edit-quick.json
    python benchmarks/gpu_edit.py --tiny --device cpu --out /tmp/gpu_edit-tiny.json   # any CPU

The model has the Stable Diffusion 1.5 architecture (UNet 860M, VAE, CLIP ViT-L text encoder)
with random weights: speed does not depend on weight values, so nothing is downloaded.

- reference: the `paper` preset as published implementations run it (eager, one timestep per
  optimizer step, fp32 weights with bf16 autocast, Adam), timed over n and 2n steps per stage
  after a warm-up (n = --reference-steps) and projected to the paper's 1000 + 1500 steps from
  the difference (the JSON says so: `projected`);
- fast: the `fast` preset, run twice: `cold` (the first edit in the process: allocator growth,
  kernel selection) and `steady` (the second);
- low-memory: the fast preset with `--low-memory`, once, for its peak memory;
- variants (`--variants [NAME ...]`; no names: all), each timed once, warm: `fast-eager`
  (without CUDA graphs), `fast+graphs` (graphs asked for whatever the card) and `lora+dpm++20`
  (a LoRA stage 2 at the same K, and the sweep in 20 DPM-Solver++ steps).

`--memory-cap GIB` lets PyTorch's allocator hold at most GIB of the card, to run as on a smaller
card. The JSON records the commit, the device, the library versions and PYTORCH_CUDA_ALLOC_CONF,
and is written after every run; the benchmark checks it is complete before it ends
(`check_report`), and exits 1 if not.

Each run ends with the η sweep of 8 images (one seed) in one batched call. Peak memory is
torch.cuda.max_memory_allocated per run on CUDA (and per stage, with max_memory_reserved
beside it: what the allocator held from the card); on the CPU, the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from imagic.backends import device_name
from imagic.bench import checkout_commit
from imagic.presets import EditConfig

ETAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)  # the 8-image η sweep
PAPER_STEPS = {"stage1": 1000, "stage2": 1500}

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs) and a tiny stand-in for CPUs.
SHAPES = {
    "sd15": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                     attention_head_dim=8, norm_num_groups=32,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                    layers_per_block=2, norm_num_groups=32, sample_size=512,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, vocab_size=49408),
    },
    "tiny": {
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                     norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
                    norm_num_groups=8, sample_size=32,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, vocab_size=1000),
    },
}
TEXT = "a photo of a sitting dog"


def build_backend(shape: str, device: torch.device):
    """A StableDiffusionBackend over random-weight components of the given shape."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagic.backends.stable_diffusion import StableDiffusionBackend
    from imagic.tokenizer import word_level_clip_tokenizer

    spec = SHAPES[shape]
    torch.manual_seed(0)
    tokenizer = word_level_clip_tokenizer(TEXT.split(), max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"], bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**spec["unet"]), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    identity = {"source": f"random-weights-{shape}", "fingerprint": "random"}
    return StableDiffusionBackend(pipe, identity, device, dtype)


def photo(size: int) -> Image.Image:
    """A smooth gradient with a bright disc: content does not matter for speed."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size),
                            indexing="ij")
    disc = (((xs - 0.4) ** 2 + (ys - 0.6) ** 2) < 0.05).float()
    rgb = torch.stack([0.2 + 0.5 * xs + 0.3 * disc, 0.3 + 0.4 * ys, 0.6 - 0.3 * xs * ys])
    return Image.fromarray((rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


def measure(backend, config, image) -> dict:
    """Stages 1–2 and the η sweep once; seconds per stage (the engine's own timings, which end
    on a device sync: each stage's last step reads the losses back) and peak memory."""
    from imagic.editor import Imagic
    from imagic.training import uses_cuda_graphs

    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(image, TEXT)
    editor.generate(session)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    t = session.timings
    stages = ("encode", "stage1", "stage2", "generate")
    peak = (max(t[f"{s}_peak_gib"] for s in stages) * 2**30 if cuda  # the engine's, per stage
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    reserved = {"reserved_memory_gib": round(max(t[f"{s}_reserved_gib"] for s in stages), 2),
                **{f"{s}_reserved_gib": round(t[f"{s}_reserved_gib"], 2) for s in stages}
                } if cuda else {}
    k1 = config.timesteps_per_step
    k2 = config.finetune_timesteps_per_step or k1
    # the steps each timed stage ran: Forgedit's joint tuning is all in stage 1's time
    steps1, steps2 = ((config.finetune_steps, 0) if config.tuning == "forgedit"
                      else (config.embed_steps, config.finetune_steps))
    return {
        "stage1_s": round(t["stage1_s"], 3), "stage2_s": round(t["stage2_s"], 3),
        "generate_s": round(t["generate_s"], 3), "total_s": round(total, 3),
        "finetune": config.finetune, "gradient_checkpointing": config.gradient_checkpointing,
        "stage1_low_precision_unet": bool(config.embed_low_precision
                                          and backend.frozen_dtype != torch.float32),
        "cuda_graphs": uses_cuda_graphs(config, backend.device),
        "tuning": config.tuning, "stage1_steps": steps1, "stage2_steps": steps2,
        "stage1_samples": steps1 * k1, "stage2_samples": steps2 * k2,
        "stage1_ms_per_sample": round(1e3 * t["stage1_s"] / max(steps1 * k1, 1), 2),
        "stage2_ms_per_sample": round(1e3 * t["stage2_s"] / max(steps2 * k2, 1), 2),
        "images": len(config.etas) * len(config.seeds),
        "peak_memory_gib": round(peak / 2**30, 2),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        **({f"{s}_peak_gib": round(t[f"{s}_peak_gib"], 2) for s in stages} if cuda else {}),
        **reserved,
    }


def project(short: dict, long: dict, steps: dict | None = None) -> dict:
    """Reference runs of n and 2n steps per stage, scaled to `steps` per stage (the paper's
    step counts by default): the difference gives the cost per step, the rest (stage 2's weight
    backup and restore, the optimizer's set-up) is counted once."""
    steps = steps or PAPER_STEPS
    out = {}
    for stage in ("stage1", "stage2"):
        n = long[f"{stage}_steps"] - short[f"{stage}_steps"]
        per_step = (long[f"{stage}_s"] - short[f"{stage}_s"]) / n
        fixed = max(short[f"{stage}_s"] - short[f"{stage}_steps"] * per_step, 0.0)
        out[f"{stage}_s_per_step"] = round(per_step, 4)
        out[f"{stage}_s_fixed"] = round(fixed, 3)
        out[f"{stage}_s"] = round(fixed + steps[stage] * per_step, 2)
    out["generate_s"] = long["generate_s"]
    out["total_s"] = round(out["stage1_s"] + out["stage2_s"] + out["generate_s"], 2)
    return out


def untimeable(short: dict, long: dict) -> str | None:
    """Why two runs cannot be projected from (a stage no slower over more steps), or None."""
    for stage in ("stage1", "stage2"):
        if long[f"{stage}_s"] <= short[f"{stage}_s"]:  # a projection from this would be nonsense
            return (f"{stage} took no longer over {long[f'{stage}_steps']} steps than over "
                    f"{short[f'{stage}_steps']} ({short[f'{stage}_s']:.2f} s, then "
                    f"{long[f'{stage}_s']:.2f} s): the machine was busy or the steps too few "
                    "to time")
    return None


def timed_pair(run, n: int) -> tuple[dict, dict, str | None]:
    """`run(n)` and `run(2n)`, timed again once if a busy moment made the longer run no slower;
    with why they still cannot be projected from, or None."""
    for _ in range(2):
        short, long = run(n), run(2 * n)
        problem = untimeable(short, long)
        if not problem:
            break
    return short, long, problem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small UNet, for CPUs and tests")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    parser.add_argument("--reference-steps", type=int, default=100,
                        help="n: the reference is timed over n and 2n steps (default 100; "
                             "fewer projects noisily, docs/PERFORMANCE.md)")
    parser.add_argument("--fast-preset", default="fast", help="the preset to compare (fast)")
    parser.add_argument("--fast-scale", type=float, default=1.0,
                        help="scale the fast preset's step counts (tests; default 1)")
    parser.add_argument("--variants", nargs="*", metavar="NAME",
                        help="also time these variants; with no names, all: fast-eager, "
                             "fast+graphs, lora+dpm++20")
    parser.add_argument("--memory-cap", type=float, metavar="GIB",
                        help="let the allocator hold at most this much of the card "
                             "(torch.cuda.set_per_process_memory_fraction), to run as on a "
                             "smaller card: 23.5 for a 24 GB one")
    parser.add_argument("--steady-runs", type=int, default=1,
                        help="time the steady fast edit this many times (default 1), to see "
                             "its spread")
    parser.add_argument("--no-low-memory", action="store_true",
                        help="skip the --low-memory run (when only the times are wanted)")
    parser.add_argument("--out", help="write the results as JSON here (after every run)")
    args = parser.parse_args(argv)
    if args.steady_runs < 1 or args.reference_steps < 1:
        parser.error("--steady-runs and --reference-steps must be at least 1")

    from imagic import __version__
    from imagic.backends import resolve_device
    from imagic.presets import get_preset, low_memory
    from imagic.session import library_versions

    device = resolve_device(args.device)
    known = variants(EditConfig())
    unknown = [name for name in args.variants or () if name not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(known)}")
    if args.memory_cap is not None:
        if device.type != "cuda" or args.memory_cap <= 0:
            parser.error("--memory-cap needs a CUDA device and a positive size")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 2**30 / total),
                                                   device.index or 0)
    shape = "tiny" if args.tiny else "sd15"
    backend = build_backend(shape, device)
    image = photo(backend.resolution)
    sweep = {"etas": ETAS, "seeds": (0,)}

    result = {
        "benchmark": "gpu_edit",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else
                                                         sys.argv[1:])]),
        "device": device_name(device),
        "shape": shape,
        "resolution": backend.resolution,
        "parameters": backend.parameter_counts(),
        "versions": {"imagic": __version__, **library_versions()},
        "commit": checkout_commit(),
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "memory_cap_gib": args.memory_cap,
    }

    def save() -> None:  # after every run, so a run cut short keeps what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    # Warm-up: kernels, allocator and the sampler, not counted
    measure(backend, replace(get_preset("paper"), embed_steps=2, finetune_steps=2,
                             sample_steps=2, etas=(1.0,), seeds=(0,)), image)
    n = args.reference_steps
    short, long, problem = timed_pair(lambda m: measure(backend, replace(
        get_preset("paper"), embed_steps=m, finetune_steps=m, **sweep), image), n)
    if problem:
        print(f"gpu_edit: the reference's {problem}; re-run, or raise --reference-steps",
              file=sys.stderr)
        return 1
    projected = project(short, long)
    result["reference"] = {
        "preset": "paper", "measured": [short, long], "projected": projected,
        "note": f"timed over {n} and {2 * n} steps per stage; the difference projected to "
                f"{PAPER_STEPS['stage1']} + {PAPER_STEPS['stage2']} steps, fixed costs counted "
                f"once"}
    save()
    fast_config = get_preset(args.fast_preset)
    if args.fast_scale != 1.0:
        fast_config = replace(
            fast_config, embed_steps=max(1, round(fast_config.embed_steps * args.fast_scale)),
            finetune_steps=max(1, round(fast_config.finetune_steps * args.fast_scale)))
    fast_config = replace(fast_config, **sweep)
    result["fast"] = {"preset": args.fast_preset, "scale": args.fast_scale}
    runs = [("cold", fast_config), ("steady", fast_config)]
    runs += [(f"steady_{i}", fast_config) for i in range(2, args.steady_runs + 1)]
    # --low-memory is a LoRA stage 2, which Forgedit's joint tuning (quick) does not have
    with_low_memory = not args.no_low_memory and fast_config.tuning == "imagic"
    runs += [("low_memory", low_memory(fast_config))] if with_low_memory else []
    for name, config in runs:
        run = measure(backend, config, image)
        run["speedup"] = round(projected["total_s"] / run["total_s"], 2)
        result["fast"][name] = run
        if name in ("cold", "steady"):  # as soon as measured, for a run cut short
            result[f"speedup_{name}"] = run["speedup"]
        print(name, json.dumps(run), flush=True)
        save()
    if args.variants is not None:
        result["variants"] = {}
        for name, config in variants(fast_config).items():
            if args.variants and name not in args.variants:
                continue
            run = measure(backend, config, image)
            run["speedup"] = round(projected["total_s"] / run["total_s"], 2)
            result["variants"][name] = run
            print(name, json.dumps(run), flush=True)
            save()
    print_table(result)
    if args.out:
        print(f"wrote {args.out}")
    problems = check_report(result, low_memory=with_low_memory,
                            variants=None if args.variants is None
                            else (args.variants or list(variants(fast_config))))
    for problem in problems:
        print(f"incomplete report: {problem}", file=sys.stderr)
    return 1 if problems else 0


RUN_FIELDS = ("stage1_s", "stage2_s", "generate_s", "total_s", "stage1_steps", "stage2_steps",
              "stage1_samples", "stage2_samples", "images", "peak_memory_gib", "cuda_graphs")


def check_report(r: dict, low_memory: bool = True, variants=None) -> list[str]:
    """What a report lacks or gets wrong, as lines (none: complete): every run asked for, each
    with its times, work and memory, and a projection consistent with the reference runs."""
    problems = [f"no {key}" for key in ("device", "versions", "commit", "reference", "fast")
                if key not in r]
    if problems:
        return problems
    runs = {"reference short": r["reference"]["measured"][0],
            "reference long": r["reference"]["measured"][-1]}
    runs |= {f"fast {name}": r["fast"].get(name)
             for name in ("cold", "steady", *(["low_memory"] if low_memory else []))}
    runs |= {f"variant {name}": r.get("variants", {}).get(name) for name in variants or ()}
    for name, run in runs.items():
        if not isinstance(run, dict):
            problems.append(f"{name} was not run")
            continue
        problems += [f"{name}: no {key}" for key in RUN_FIELDS if key not in run]
        problems += [f"{name}: {key} is not positive" for key in ("total_s", "images")
                     if not run.get(key, 0) > 0]
    if not problems:
        projected = project(runs["reference short"], runs["reference long"])
        if projected != r["reference"]["projected"]:
            problems.append("the projection does not follow from the reference runs")
    return problems


def variants(fast: EditConfig) -> dict[str, EditConfig]:
    """Candidates beside the fast preset (`--variants`): without CUDA graphs, with them
    whatever the card, and stage 2 as a LoRA adapter (no checkpointing) with DPM-Solver++ 20."""
    found = {"fast-eager": replace(fast, cuda_graphs=False),
             "fast+graphs": replace(fast, cuda_graphs=True)}
    if fast.tuning == "imagic":  # Forgedit's joint stage trains the blocks, never a LoRA
        found["lora+dpm++20"] = replace(fast, finetune="lora", sampler="dpm++", sample_steps=20)
    return found


def print_table(r: dict) -> None:
    ref, proj = r["reference"]["measured"][-1], r["reference"]["projected"]
    nan = float("nan")  # reserved memory: CUDA only
    rows = [("reference (projected)", proj["stage1_s"], proj["stage2_s"], proj["generate_s"],
             proj["total_s"], ref["peak_memory_gib"], ref.get("reserved_memory_gib", nan))]
    runs = [(f"{r['fast']['preset']} {name}", run) for name, run in r["fast"].items()
            if isinstance(run, dict)]
    runs += [(name, run) for name, run in r.get("variants", {}).items()]
    for name, f in runs:
        rows.append((name, f["stage1_s"], f["stage2_s"], f["generate_s"], f["total_s"],
                     f["peak_memory_gib"], f.get("reserved_memory_gib", nan)))
    print(f"{r['device']} — {r['shape']} at {r['resolution']} px, 8-image η sweep")
    print(f"{'run':27} {'stage 1 s':>10} {'stage 2 s':>10} {'sweep s':>9} {'total s':>9} "
          f"{'peak GiB':>9} {'reserved':>9}")
    for name, *values in rows:
        print(f"{name:27} " + " ".join(f"{v:>9.2f}" if i else f"{v:>10.2f}"
                                       for i, v in enumerate(values)))
    print(f"speed-up, steady: {r['speedup_steady']}×; cold: {r['speedup_cold']}×")


if __name__ == "__main__":
    sys.exit(main())
