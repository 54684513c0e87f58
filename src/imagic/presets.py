"""The recipe of an edit (`EditConfig`), its checks, and the named presets.

A preset is a frozen `EditConfig`. `EditConfig.with_options` applies a user's options to one,
checking every field and every combination: the CLI, the UI and the API all go through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .auto_eta import AUTO_ETAS
from .errors import InputError
from .forgetting import CHOICES as FORGET_CHOICES

SAMPLERS = ("ddim", "dpm++")  # stage 3's solvers (backends/diffusers_unet.make_sampler)
STARTS = ("noise", "inversion")  # where stage 3's sampling starts (EditConfig.start)
TUNINGS = ("imagic", "forgedit")  # how stages 1-2 run (EditConfig.tuning)
INTERPOLATIONS = ("linear", "vp", "attention")  # how stage 3 mixes e_tgt and e_opt
CUDA_GRAPHS = {"auto": None, "on": True, "off": False}  # option value -> EditConfig.cuda_graphs
MAX_SEED = 2**63 - 1  # torch generators take seeds up to this


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
    # where the card has room for it (training.uses_cuda_graphs)
    cuda_graphs: bool | None = False
    aux_finetune_steps: int = 1500  # cascades only: steps per super-resolution stage, on e_tgt
    aux_finetune_lr: float = 5e-7  # cascades only
    # cascades only: the side of the random crops a super-resolution stage fine-tunes on (a
    # stage without self-attention is local, as Imagen trains them); 0: the whole image
    aux_finetune_crop: int = 0
    aux_timesteps_per_step: int | None = None  # cascades only: their K; None: stage 2's K
    # cascades only: stage 2 draws a super-resolution stage's augmentation level from 0 to this
    # (None: to the highest its training drew), around the one level it samples at
    aux_finetune_max_level: int | None = None
    timesteps_per_step: int = 1  # K: (t, ε) draws averaged per optimizer step (paper: 1)
    finetune_timesteps_per_step: int | None = None  # K for stage 2; None: the same as stage 1
    seed: int = 0  # seeds every draw of t and ε in stages 1 and 2
    # "imagic": stage 1 then stage 2 (the paper); "forgedit": one joint stage (Forgedit), e at
    # embed_lr and the UNet's down and up blocks but the first of each at finetune_lr, for
    # finetune_steps steps (embed_steps unused); full fine-tuning only
    tuning: str = "imagic"
    # --- stage 3: interpolation and generation ---
    etas: tuple[float, ...] = (0.6, 0.7, 0.8)  # η: ē = η·e_tgt + (1−η)·e_opt
    seeds: tuple[int, ...] = (0,)  # one image per (η, seed); the seed fixes the initial noise
    guidance: float = 7.5  # classifier-free guidance scale
    sample_steps: int = 50  # sampler steps
    sampler: str = "ddim"  # "ddim" (the paper's) or "dpm++" (DPM-Solver++ 2M, fewer steps)
    sample_batch: int = 8  # images per sampling call
    # "noise": fresh noise per seed (the paper); "inversion": the input itself run up the noise
    # schedule by DDIM under θ' and e_opt (a cascade's super-resolution stages: each its own, at
    # e_tgt), so every η starts from the input's own noise and keeps its details (not in the
    # paper; one image per η, so one seed, and DDIM only)
    start: str = "noise"
    # "linear": the paper's ē = η·e_tgt + (1−η)·e_opt; "vp": Forgedit's vector projection,
    # e_opt plus η times the part of e_tgt orthogonal to it (editor.vector_projection);
    # "attention": AID's attention interpolation with the e_opt and e_tgt images (attention.py)
    # for the first attention_warmup of the sampling steps
    interpolation: str = "linear"
    attention_warmup: float = 0.5
    # Forgedit's forgetting: groups of θ' that go back to θ while sampling (forgetting.py; "auto":
    # each of forgetting.AUTO_CANDIDATES, for --eta auto to pick from), and how far (1: all the
    # way)
    forget: str = "none"
    forget_strength: float = 1.0

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_options(self, *, low_memory: bool = False, **options) -> EditConfig:
        """This recipe with a user's options applied; an option given as None keeps the recipe's
        value. Options are EditConfig fields, with three conveniences: `etas="auto"` (the
        auto-η sweep), `cuda_graphs` "auto"/"on"/"off", and `low_memory` (a LoRA stage 2 with
        gradient checkpointing, `presets.low_memory`). Beyond each field's check, it refuses
        options that contradict each other or do nothing, and resolves two defaults:
        `timesteps_per_step` alone sets both stages' K, and with start "inversion" and no seeds
        given, only the recipe's first seed is kept (every seed would give the same picture)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown EditConfig option(s): {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if v is not None}
        if given.get("etas") == "auto":
            given["etas"] = AUTO_ETAS
        if isinstance(given.get("cuda_graphs"), str) and given["cuda_graphs"] in CUDA_GRAPHS:
            given["cuda_graphs"] = CUDA_GRAPHS[given["cuda_graphs"]]
        for key in ("etas", "seeds"):
            if key in given:
                if not isinstance(given[key], (list, tuple)):
                    raise InputError(f"{key} must be a list of numbers, got {given[key]!r}")
                given[key] = tuple(given[key])
        if "timesteps_per_step" in given and "finetune_timesteps_per_step" not in given:
            given["finetune_timesteps_per_step"] = None  # one K for both stages, as asked
        if ({"timesteps_per_step", "finetune_timesteps_per_step"} & set(given)
                and "aux_timesteps_per_step" not in given):
            given["aux_timesteps_per_step"] = None  # the super-resolution stages follow stage 2
        if low_memory and given.get("finetune") == "full":
            raise InputError("--low-memory trains a LoRA adapter: drop --finetune full")
        lora = low_memory or given.get("finetune", self.finetune) == "lora"
        if not lora and ("lora_rank" in given or "lora_lr" in given):
            raise InputError("--lora-rank and --lora-lr set a LoRA stage 2: add --finetune lora "
                             "(or --low-memory), or drop them")
        for rate in ("finetune_lr", "aux_finetune_lr"):
            if lora and rate in given:
                flag = "--" + rate.replace("_", "-")
                raise InputError(f"{flag} is the full fine-tune's rate; a LoRA stage 2 uses "
                                 "--lora-lr")
        if "attention_warmup" in given and given.get("interpolation",
                                                      self.interpolation) != "attention":
            raise InputError("--attention-warmup is attention interpolation's: add "
                             "--interpolation attention, or drop it")
        if "forget_strength" in given and given.get("forget", self.forget) == "none":
            raise InputError("--forget-strength says how far --forget's groups go back: add "
                             "--forget STRATEGY, or drop it")
        # --low-memory: see `low_memory` below
        base = (replace(self, finetune="lora", gradient_checkpointing=True, cuda_graphs=False)
                if low_memory else self)
        if "seeds" not in given and given.get("start", base.start) == "inversion":
            given["seeds"] = base.seeds[:1]
        return replace(base, **given)

    @classmethod
    def from_dict(cls, data: dict) -> EditConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("etas", "seeds"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def check_types(config: EditConfig) -> None:
    """Each field holds what its annotation says (a session file or a caller can hand over
    anything): whole numbers where counts are meant, finite numbers where rates and scales are."""
    for f in fields(config):
        value, kind = getattr(config, f.name), f.type
        if kind == "int" or kind == "int | None" and value is not None:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)
        elif kind == "bool" or kind == "bool | None" and value is not None:
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind.startswith("tuple["):
            number = float if "float" in kind else int
            ok = isinstance(value, tuple) and all(
                isinstance(v, (int, number)) and not isinstance(v, bool)
                and math.isfinite(v) for v in value)
        else:
            ok = True
        if not ok:
            raise InputError(f"{f.name} must be {_KINDS.get(kind, kind)}, got {value!r}")


_KINDS = {"int": "a whole number", "int | None": "a whole number or None",
          "float": "a finite number", "bool": "true or false", "str": "a string",
          "bool | None": "true, false or None",
          "tuple[float, ...]": "finite numbers", "tuple[int, ...]": "whole numbers"}
MAX_VALUES = 1000  # η values or seeds in one config: more is a typo, not an edit


def check_config(config: EditConfig) -> None:
    """Fail fast with one line on numbers no edit can use."""
    check_types(config)
    if not 0 <= config.seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and 2^63 - 1, got {config.seed}")
    for name in ("etas", "seeds"):
        if len(getattr(config, name)) > MAX_VALUES:
            raise InputError(f"{len(getattr(config, name))} {name}: at most {MAX_VALUES} in "
                             "one edit")
    for name in ("embed_steps", "finetune_steps", "aux_finetune_steps", "aux_finetune_crop",
                 "aux_finetune_max_level"):
        if (getattr(config, name) or 0) < 0:
            raise InputError(f"{name} must be 0 or more, got {getattr(config, name)}")
    for name in ("embed_lr", "finetune_lr", "lora_lr", "aux_finetune_lr"):
        if not getattr(config, name) > 0:
            raise InputError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("timesteps_per_step", "sample_steps", "sample_batch", "lora_rank"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("finetune_timesteps_per_step", "aux_timesteps_per_step"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
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
    if config.tuning not in TUNINGS:
        raise InputError(f"tuning must be one of {', '.join(TUNINGS)}, got {config.tuning!r}")
    if config.tuning == "forgedit" and config.finetune != "full":
        raise InputError("tuning 'forgedit' trains the UNet's blocks themselves, not a LoRA "
                         "adapter: use --finetune full (and no --low-memory)")
    if config.interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                         f"{config.interpolation!r}")
    if not 0 < config.attention_warmup <= 1:
        raise InputError(f"attention_warmup is a fraction of the sampling steps in (0, 1], got "
                         f"{config.attention_warmup:g}")
    if config.forget not in FORGET_CHOICES:
        raise InputError(f"forget must be one of {', '.join(FORGET_CHOICES)}, got "
                         f"{config.forget!r}")
    if not 0 <= config.forget_strength <= 1:
        raise InputError(f"forget_strength must lie in [0, 1], got {config.forget_strength:g}")
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
    for seed in config.seeds:
        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seeds must be between 0 and 2^63 - 1, got {seed}")
    if config.guidance < 0:
        raise InputError(f"guidance must be 0 or more, got {config.guidance:g}")


PRESETS: dict[str, EditConfig] = {
    # The paper's Stable Diffusion recipe (Kawar et al. 2023, §4 and its appendix): Adam, stage 1
    # 1000 steps at lr 2e-3, stage 2 1500 steps at lr 5e-7, one timestep per step; guidance 7.5
    # and 50 DDIM steps; η 0.6–0.8, the range the paper found best for most edits (§4.3). The
    # LoRA rank and rate are the diffusers LoRA training scripts' defaults: the paper fine-tunes
    # every weight.
    "paper": EditConfig(),
    # The paper's sample budget (1000 + 1500 samples) in fewer, larger steps: K timesteps per
    # step with each rate × √K, the square-root scaling rule for Adam (Malladi et al., NeurIPS
    # 2022), which kept the background closer than × K on ShapesBench (docs/RESULTS.md). Stage 2
    # stays at K = 8: its activations grow with K beside fp32 weights, gradients and Adam
    # states. Stage 1 holds the frozen θ in bf16; CUDA graphs where the card has room for them
    # (training.uses_cuda_graphs). Times and memory: docs/PERFORMANCE.md.
    "fast": EditConfig(
        embed_steps=63, embed_lr=2e-3 * math.sqrt(16), timesteps_per_step=16,
        embed_low_precision=True, cuda_graphs=None,
        finetune_steps=188, finetune_lr=5e-7 * math.sqrt(8), finetune_timesteps_per_step=8,
        lora_lr=1e-4 * math.sqrt(8), aux_finetune_steps=188, aux_finetune_lr=5e-7 * math.sqrt(8),
    ),
    # Forgedit's joint tuning (Zhang et al. 2023; their code, witcherofresearch/Forgedit): e and
    # the UNet's down and up blocks but the first of each in one Adam, at 1e-3 and 6e-5, 40
    # steps of 10 timesteps (400 samples against the paper's 2500), batched as in `fast`; e
    # starts at e_tgt, where Forgedit starts at a BLIP caption of the input (no captioner is
    # loaded here). Forgedit's early stop (loss < 0.03 after 350 samples) could save at most 4
    # of the 40 steps and is left out. Stage 3: guidance 7.5 and 50 DDIM steps, as theirs.
    "quick": EditConfig(
        tuning="forgedit", embed_lr=1e-3, finetune_lr=6e-5, finetune_steps=40,
        timesteps_per_step=10, cuda_graphs=None,
    ),
    # The embedded ShapesWorld model (docs/models/shapes.md), sized so an edit takes about a
    # minute on 2 CPU cores: K = 4 (a CPU runs a batch of 4 faster per sample than 1), rates
    # chosen by a sweep at K = 1 and × √K as in `fast`. Stage 3 starts from the input's
    # inversion, which keeps details the caption never names, at guidance 1.5, where the
    # background stays closest with the edit still made from η ≈ 0.9 (docs/RESULTS.md).
    "shapes": EditConfig(
        embed_steps=100, embed_lr=1.25e-2 * math.sqrt(4), finetune_steps=150,
        finetune_lr=1.25e-5 * math.sqrt(4), timesteps_per_step=4, etas=(0.8, 0.9, 1.0, 1.1, 1.2),
        seeds=(0,), guidance=1.5, sample_steps=50, start="inversion",
    ),
    # The ShapesWorld 2 cascade (docs/models/shapes2.md): `shapes` for the 32 px base but a
    # rate four times higher; the super-resolution stage fine-tuned on 32 px crops (it has no
    # self-attention, as in training), 200 steps of K = 8, in less time than 50 steps of K = 4
    # on the whole image. Stage 3 without guidance, which moves the base's colours less, at
    # η 0.7-1.1, each stage from its own inversion of the input. Chosen on ShapesBench 2's
    # tuning cases.
    "shapes2": EditConfig(
        embed_steps=100, embed_lr=1.25e-2 * math.sqrt(4), finetune_steps=150,
        finetune_lr=5e-5 * math.sqrt(4), timesteps_per_step=4, etas=(0.7, 0.8, 0.9, 1.0, 1.1),
        seeds=(0,), guidance=1.0, sample_steps=50, start="inversion",
        aux_finetune_steps=200, aux_finetune_lr=3e-4, aux_finetune_crop=32,
        aux_timesteps_per_step=8,
    ),
    # SDXL base 1.0 (backends/sdxl.py; its default). Stages 1-2: the paper's rates and its
    # 1000 + 1500 samples, in steps of K = 4 with each rate × √K as in `fast` (K = 4, not 16/8:
    # a 1024 px latent holds 4× SD's activations per sample). Gradient checkpointing at 1024 px,
    # as diffusers' SDXL fine-tune example runs (examples/text_to_image/README_sdxl.md), so no
    # CUDA graphs. LoRA: train_text_to_image_lora_sdxl.py's defaults, rank 4 and lr 1e-4 (× √K).
    # Stage 3: StableDiffusionXLPipeline's defaults, guidance 5.0 and 50 steps; η as `paper`.
    "sdxl": EditConfig(
        embed_steps=250, embed_lr=2e-3 * math.sqrt(4), timesteps_per_step=4,
        embed_low_precision=True, finetune_steps=375, finetune_lr=5e-7 * math.sqrt(4),
        lora_rank=4, lora_lr=1e-4 * math.sqrt(4), gradient_checkpointing=True,
        cuda_graphs=False, guidance=5.0, sample_steps=50,
    ),
    # Stable Diffusion 3.x (backends/sd3.py; its default). Stages 1-2 as `sdxl`: the paper's
    # rates and 1000 + 1500 samples in steps of K = 4, rates × √K, gradient checkpointing at
    # 1024 px; stage 2 fine-tunes every weight, as the paper does. LoRA:
    # train_dreambooth_lora_sd3.py's defaults, rank 4 and lr 1e-4 (× √K). Stage 3:
    # StableDiffusion3Pipeline's defaults, guidance 7.0 and 28 steps (of the flow Euler solver,
    # which "ddim" runs on a flow model).
    "sd3": EditConfig(
        embed_steps=250, embed_lr=2e-3 * math.sqrt(4), timesteps_per_step=4,
        embed_low_precision=True, finetune_steps=375, finetune_lr=5e-7 * math.sqrt(4),
        lora_rank=4, lora_lr=1e-4 * math.sqrt(4), gradient_checkpointing=True,
        cuda_graphs=False, guidance=7.0, sample_steps=28,
    ),
    # FLUX.1-dev (backends/flux.py; its default). Stages 1-2 as `sd3`, but stage 2 trains a LoRA
    # adapter (fp32 weights, gradients and Adam states of 12B parameters do not fit one card) on
    # train_dreambooth_lora_flux.py's defaults, rank 4 and lr 1e-4 (× √K); θ stays fp32 in stage
    # 1 (parking 48 GB of it in pinned host memory costs more than it saves). Stage 3:
    # FluxPipeline's defaults, guidance 3.5 (the distilled model's guidance embedding, no
    # classifier-free guidance) and 28 steps.
    "flux": EditConfig(
        embed_steps=250, embed_lr=2e-3 * math.sqrt(4), timesteps_per_step=4,
        finetune="lora", finetune_steps=375, lora_rank=4, lora_lr=1e-4 * math.sqrt(4),
        gradient_checkpointing=True, cuda_graphs=False, guidance=3.5, sample_steps=28,
    ),
    # FLUX.1-schnell (its default): `flux` for stages 1-2; stage 3 as schnell's model card runs
    # it, 4 steps (guidance 0: schnell has neither a guidance embedding nor CFG, so it is unused).
    "flux-schnell": EditConfig(
        embed_steps=250, embed_lr=2e-3 * math.sqrt(4), timesteps_per_step=4,
        finetune="lora", finetune_steps=375, lora_rank=4, lora_lr=1e-4 * math.sqrt(4),
        gradient_checkpointing=True, cuda_graphs=False, guidance=0.0, sample_steps=4,
    ),
    # DeepFloyd IF, IF-I + IF-II (backends/deepfloyd_if.py; its default), as the paper runs
    # Imagen (§4.1): stage 1 100 Adam steps at lr 1e-3; stage 2 1500 steps on the 64 px model
    # and 1500 on the 64→256 px one; η 0.6–0.8; DDIM. The paper does not report Imagen's
    # fine-tuning rates, so they are diffusers' IF DreamBooth examples' (docs training/
    # dreambooth.md, DeepFloyd IF): full, 1e-7 for IF-I and 5e-6 for IF-II; LoRA, the IF-I
    # example's 5e-6 (one LoRA rate serves both stages) at train_dreambooth_lora.py's rank 4.
    # Stage 3: IFPipeline's defaults, guidance 7.0 and 100 steps (IF-II: its pipeline's 4.0,
    # 50 steps and noise level 250, in the backend).
    "deepfloyd-if": EditConfig(
        embed_steps=100, embed_lr=1e-3, finetune_steps=1500, finetune_lr=1e-7,
        aux_finetune_steps=1500, aux_finetune_lr=5e-6, lora_rank=4, lora_lr=5e-6,
        guidance=7.0, sample_steps=100,
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
    return config.with_options(low_memory=True)


def get_preset(name: str) -> EditConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None
