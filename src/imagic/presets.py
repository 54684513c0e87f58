"""Named edit configurations. Every number says where it comes from.

A preset is a frozen `EditConfig`; the CLI and the API override single fields with
`dataclasses.replace(config, field=value)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import InputError

SAMPLERS = ("ddim", "dpm++")  # stage 3's solvers (backends/diffusers_unet.make_sampler)
STARTS = ("noise", "inversion")  # where stage 3's sampling starts (EditConfig.start)


@dataclass(frozen=True)
class EditConfig:
    # --- stage 1: text embedding optimization (θ frozen, e starts at e_tgt) ---
    embed_steps: int = 1000  # optimizer steps
    embed_lr: float = 2e-3  # Adam learning rate for e
    # --- stage 2: model fine-tuning (e_opt frozen) ---
    finetune_steps: int = 1500  # optimizer steps
    finetune_lr: float = 5e-7  # Adam learning rate for θ when finetune == "full"
    finetune: str = "full"  # "full": every UNet weight; "lora": a peft LoRA adapter
    lora_rank: int = 4  # rank of the LoRA adapter (finetune == "lora")
    lora_lr: float = 1e-4  # Adam learning rate for the LoRA weights
    gradient_checkpointing: bool = False  # stages 1-2: recompute activations in the backward
    embed_low_precision: bool = False  # stage 1: frozen θ in bf16 on CUDA (fp32 kept on the host)
    # stages 1-2 on CUDA: record a training step once as a CUDA graph and replay it; None:
    # where the card has room for it (editor.uses_cuda_graphs)
    cuda_graphs: bool | None = False
    aux_finetune_steps: int = 1500  # cascades only: steps per super-resolution stage, on e_tgt
    aux_finetune_lr: float = 5e-7  # cascades only
    timesteps_per_step: int = 1  # K: (t, ε) draws averaged per optimizer step (paper: 1)
    finetune_timesteps_per_step: int | None = None  # K for stage 2; None: the same as stage 1
    seed: int = 0  # seeds every draw of t and ε in stages 1 and 2
    # --- stage 3: interpolation and generation ---
    etas: tuple[float, ...] = (0.6, 0.7, 0.8)  # η: ē = η·e_tgt + (1−η)·e_opt
    seeds: tuple[int, ...] = (0,)  # one image per (η, seed); the seed fixes the initial noise
    guidance: float = 7.5  # classifier-free guidance scale
    sample_steps: int = 50  # sampler steps
    sampler: str = "ddim"  # "ddim" (the paper's) or "dpm++" (DPM-Solver++ 2M, fewer steps)
    sample_batch: int = 8  # images per sampling call
    # "noise": fresh noise per seed (the paper); "inversion": the input itself run up the noise
    # schedule by DDIM under θ' and e_opt, so every η starts from the input's own noise and keeps
    # its details (not in the paper; one image per η, so one seed, and DDIM only)
    start: str = "noise"

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("etas", "seeds"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def check_config(config: EditConfig) -> None:
    """Fail fast with one line on numbers no edit can use."""
    for name in ("embed_steps", "finetune_steps", "aux_finetune_steps"):
        if getattr(config, name) < 0:
            raise InputError(f"{name} must be 0 or more, got {getattr(config, name)}")
    for name in ("embed_lr", "finetune_lr", "lora_lr", "aux_finetune_lr"):
        if not getattr(config, name) > 0:
            raise InputError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("timesteps_per_step", "sample_steps", "sample_batch", "lora_rank"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.finetune_timesteps_per_step is not None and config.finetune_timesteps_per_step < 1:
        raise InputError("finetune_timesteps_per_step must be at least 1, got "
                         f"{config.finetune_timesteps_per_step}")
    if config.sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {config.sampler!r}")
    if config.start not in STARTS:
        raise InputError(f"start must be one of {', '.join(STARTS)}, got {config.start!r}")
    if config.start == "inversion" and config.sampler != "ddim":
        raise InputError("start 'inversion' runs DDIM backwards from the input, so it samples "
                         f"with ddim, not {config.sampler!r} (start 'noise', --start noise, "
                         "takes any sampler)")
    if config.start == "inversion" and len(config.seeds) > 1:
        raise InputError("start 'inversion' starts every image from the input's own inversion, "
                         "so every seed gives the same picture: give one seed (start 'noise', "
                         "--start noise, samples one picture per seed)")
    if config.cuda_graphs not in (True, False, None):
        raise InputError(f"cuda_graphs must be True, False or None (auto), got "
                         f"{config.cuda_graphs!r}")
    if config.cuda_graphs is True and config.gradient_checkpointing:
        raise InputError("cuda_graphs does not record gradient checkpointing (it recomputes "
                         "the forward pass inside the backward, with the GPU's random state "
                         "saved and restored): turn one of them off")
    if config.finetune not in ("full", "lora"):
        raise InputError(f"finetune must be 'full' or 'lora', got {config.finetune!r}")
    if not config.etas:
        raise InputError("give at least one η")
    for eta in config.etas:
        if not -1.0 <= eta <= 2.0:
            raise InputError(f"η must lie in [-1, 2], got {eta:g}")
    if not config.seeds:
        raise InputError("give at least one seed")
    if config.guidance < 0:
        raise InputError(f"guidance must be 0 or more, got {config.guidance:g}")


PRESETS: dict[str, EditConfig] = {
    # The paper's Stable Diffusion recipe (Kawar et al. 2023, §4 and the appendix on the
    # Stable Diffusion implementation): Adam, stage 1 1000 steps at lr 2e-3, stage 2 1500 steps at
    # lr 5e-7, one timestep per step; classifier-free guidance 7.5 and 50 DDIM steps (the SD
    # defaults the paper kept); η 0.6–0.8, the range the paper found best for most edits (§4.3).
    # lora_lr 1e-4 and rank 4 are the diffusers LoRA training scripts' defaults, not the paper's:
    # the paper fine-tunes every weight.
    "paper": EditConfig(),
    # The paper's sample budget (1000 samples in stage 1, 1500 in stage 2) in fewer, larger
    # optimizer steps: K timesteps per step, as one batch, with every learning rate × √K: the
    # learning-rate part of the square-root scaling rule for Adam (Malladi et al., "On the SDEs
    # and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022: a batch κ times larger
    # takes lr × √κ; the rule also rescales Adam's β and ε, which stay at their defaults here,
    # and its derivation needs κ·(1 − β1) < 1, which K = 16 is not).
    # Measured on ShapesBench with the embedded model (docs/RESULTS.md, "Batched timesteps"):
    # lr × √K keeps the background closer to the input than lr × K (SSIM +0.10 ± 0.03, PSNR
    # +1.2 ± 0.7 dB, success as often or more; at these K against K = 1: the same success,
    # PSNR −0.2 ± 0.4 dB). Measured on an H100 (benchmarks/gpu_edit.py, SD-1.5 shape,
    # docs/PERFORMANCE.md): 9.1–9.3 ms per stage-1 sample at K = 16, 17–25 ms per stage-2
    # sample at K = 8 (by machine), 42–52 s per edit against 360–408 s for `paper` timed over
    # 100 and 200 steps (≈ 7–8.6×) without graphs; peak 21.19 GiB, in stage 2. Stage 2 stays
    # at K = 8 because its activations grow with K beside fp32 weights, gradients and Adam
    # states.
    # Stage 1 holds the frozen θ in bf16 (embed_low_precision): convolutions and matmuls see the
    # same bf16 weights autocast would make, only the weights autocast keeps in fp32 (the norms)
    # are rounded. Measured against the same preset without it, in one run: stage 1's peak
    # 23.48 → 20.30 GiB, its time unchanged (9.18 s).
    # Sampling stays the paper's 50 DDIM steps: DPM-Solver++ in 20 was not clearly at parity on
    # ShapesBench with these rates (docs/RESULTS.md, "Batched timesteps").
    # CUDA graphs where the card has room (cuda_graphs None: editor.uses_cuda_graphs). Measured
    # on an H100 in one run (docs/PERFORMANCE.md, "CUDA graphs"): 47.3 → 38.0 s per edit, stage 2
    # 34.0 → 24.4 s (its K = 8 step waited on Python's kernel launches), stage 1 at K = 16 not
    # faster (9.4 → 9.7 s); the same allocated peak (21.3 GiB), but the allocator reserved up to
    # 37.7 GiB, and run as on a 24 GB card (a 23.5 GiB cap) stage 2's recording ran out of
    # memory where the eager preset fits. So graphs are recorded only with ≥ 40 GiB to use.
    "fast": EditConfig(
        embed_steps=63, embed_lr=2e-3 * math.sqrt(16), timesteps_per_step=16,
        embed_low_precision=True, cuda_graphs=None,
        finetune_steps=188, finetune_lr=5e-7 * math.sqrt(8), finetune_timesteps_per_step=8,
        lora_lr=1e-4 * math.sqrt(8), aux_finetune_steps=188, aux_finetune_lr=5e-7 * math.sqrt(8),
    ),
    # The embedded ShapesWorld model (2.5M-parameter pixel UNet, 32×32), tuned on the CPU so a
    # whole edit takes about a minute on 2 cores (docs/models/shapes.md has the sweep):
    # - K = 4 timesteps per step: 400 samples in stage 1 and 600 in stage 2 at batch 4, which a
    #   CPU runs ~2.5× faster per sample than batch 1;
    # - full fine-tune rates 1.25e-2 (stage 1) and 1.25e-5 (stage 2) for one sample per step, × √K
    #   as in `fast`: 2.5e-2 and 2.5e-5 (until 2026-11-27 × K, 5e-2 and 5e-5, which kept the
    #   background less faithfully: docs/RESULTS.md, "Batched timesteps"). Stage 1 must move
    #   the 64-wide embedding far enough from e_tgt that the fine-tuned model tells them
    #   apart (1e-2 at K = 4 left every η at the input's colour); stage 2 at 1e-4 for 200 steps
    #   overfits (the text stops mattering), at 5e-6 it underfits (the background drifts);
    # - stage 3 starts from the input's inversion (start "inversion", not in the paper): on
    #   ShapesBench (80 cases, seed 0, docs/RESULTS.md) it keeps the input's pebbles in 16–26%
    #   of the edits at η 0.7–1.0 (guidance 4) where fresh noise keeps 0–1%, SSIM +0.11 ± 0.01,
    #   success as often from η 0.9 (99%); so one seed, one image per η;
    # - guidance 1.5, not the model's training default 4: from the inversion (which runs without
    #   guidance) more guidance pushes the background away. On the weights before run 5b,
    #   guidance 2 against 4 kept the pebbles in 45–57% of ShapesBench's held-out edits (cases
    #   40–79) instead of 10–20%, the background 4.3–4.5 dB closer; on run 5b's weights, 1.5
    #   against 2 (chosen on cases 16–39, confirmed on 40–79): success the same from η 0.9
    #   (100%), the pebbles kept as often or more, the background 0.7–0.8 ± 0.1 dB closer;
    # - η 0.8–1.2: at guidance 1.5 the edit is made from η ≈ 0.8–0.9 (83–97.5% at 0.8, 100% from
    #   0.9);
    # - 50 DDIM steps, the paper's sampler (`--start noise --sampler dpm++ --sample-steps 20`
    #   halves a fresh-noise sweep; on ShapesBench it was not clearly at parity, see `fast`).
    "shapes": EditConfig(
        embed_steps=100, embed_lr=1.25e-2 * math.sqrt(4), finetune_steps=150,
        finetune_lr=1.25e-5 * math.sqrt(4), timesteps_per_step=4, etas=(0.8, 0.9, 1.0, 1.1, 1.2),
        seeds=(0,), guidance=1.5, sample_steps=50, start="inversion",
    ),
}

DEFAULT_PRESET = "paper"


def low_memory(config: EditConfig) -> EditConfig:
    """`--low-memory`: stage 2 trains a LoRA adapter (rank and lr from the config) instead of
    every weight, and both stages use gradient checkpointing. Full fine-tuning keeps fp32
    weights, gradients and two Adam states: 16 bytes per parameter, 13.8 GB for SD-1.5's
    860M-parameter UNet before any activation; a LoRA adapter's are a few MB, and checkpointing
    keeps only the block boundaries' activations for the backward pass (K timesteps per step
    multiply them). This departs from the paper, which fine-tunes every weight. `cuda_graphs`
    does not record checkpointing, so it is turned off."""
    return replace(config, finetune="lora", gradient_checkpointing=True, cuda_graphs=False)


def get_preset(name: str) -> EditConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None
