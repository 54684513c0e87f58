"""Imagic's three stages, as in section 3 of Kawar et al., "Imagic: Text-Based Real Image Editing
with Diffusion Models" (CVPR 2023, arXiv 2210.09276).

Names in this file and the paper's symbols:

    x0        the input image x, in the model's space (SD: its VAE latent)
    e_tgt     e_tgt, the text encoder's embedding of the target text
    e_opt     e_opt, the embedding that best reconstructs x0 (stage 1)
    θ         the diffusion model's weights; stage 2 trains them into θ' (kept as a `Delta`)
    eta       η, the interpolation weight of stage 3: ē = η·e_tgt + (1−η)·e_opt
    x_t, t    the noised input at timestep t, drawn inside `Backend.loss`
    f_θ       the model's prediction of ε (or v), also inside `Backend.loss`

    stage 1  e_opt = argmin_e  L(x0, e, θ)           e starts at e_tgt, θ frozen      (eq. 2)
    stage 2  θ'    = argmin_θ  L(x0, e_opt, θ)       e_opt frozen
    stage 3  ē = η·e_tgt + (1−η)·e_opt; sample with θ' and classifier-free guidance  (eq. 3)

with L(x, e, θ) = E_t,ε ‖target − f_θ(x_t, t, e)‖² (eq. 1). Nothing here knows a model family:
everything model-specific is behind the `Backend` protocol (backends/base.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import attention
from .backends.base import Backend, TextCond
from .errors import InputError
from .forgetting import candidates, check_forgetting, forget
from .images import check_size, min_side, to_square, upright_rgb
from .presets import EditConfig, get_preset
from .session import EditSession
from .training import measured, train

# --------------------------------------------------------------------------- the three stages


def optimize_embedding(
    backend: Backend,
    x0: torch.Tensor,
    e_tgt: TextCond,
    config: EditConfig,
    quiet: bool = False,
) -> tuple[TextCond, list[float]]:
    """Stage 1: e_opt = argmin_e L(x0, e, θ), starting from e_tgt, with θ frozen (paper eq. 2)."""
    generator = torch.Generator("cpu").manual_seed(config.seed)
    e = e_tgt.map(lambda t: t.detach().float().clone().requires_grad_(True))
    # θ is frozen here: `fast` holds it in bf16 on a GPU (less memory; autocast makes the same
    # bf16 weights for convolutions and matmuls, and only the norms' weights are rounded)
    frozen = backend.frozen_in_low_precision() if config.embed_low_precision else nullcontext()
    with frozen:
        losses = train(
            backend, config, list(e.tensors().values()), config.embed_lr,
            draw=lambda: backend.draw(x0, generator, batch=config.timesteps_per_step),  # (t, ε)
            loss_at=lambda t, noise: backend.loss_at(x0, e, t, noise),  # L(x0, e, θ) there
            steps=config.embed_steps, label="stage 1/3 embedding", quiet=quiet,
        )
    return e.map(lambda t: t.detach()), losses


def finetune(
    backend: Backend,
    x0: torch.Tensor,
    cond: TextCond,
    config: EditConfig,
    stage: str = "base",
    quiet: bool = False,
) -> list[float]:
    """Stage 2: θ' = argmin_θ L(x0, cond, θ), with the conditioning frozen.

    For the base model, cond = e_opt. For the super-resolution stages of a cascade the paper
    fine-tunes on the same image conditioned on e_tgt (§3.1), with their own steps and rate.
    The trained weights stay in the backend until `Backend.take_delta`.
    """
    base = stage == "base"
    steps = config.finetune_steps if base else config.aux_finetune_steps
    lr = config.lora_lr if config.finetune == "lora" else (
        config.finetune_lr if base else config.aux_finetune_lr
    )
    # Each stage draws from its own stream (stage 1 uses `seed`), so changing one stage's steps
    # never moves another's draws.
    offset = 1 if base else 2 + backend.auxiliary_stages.index(stage)
    generator = torch.Generator("cpu").manual_seed(config.seed + offset)
    # A LoRA adapter starts from random weights drawn from torch's global generator: seed it
    # here too, so the same seed gives the same edit (fork_rng restores the caller's state).
    device = torch.device(backend.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + offset)
        params = backend.trainable_parameters(config.finetune, lora_rank=config.lora_rank,
                                              stage=stage)
    cond = cond.map(lambda t: t.detach())
    k = config.finetune_timesteps_per_step or config.timesteps_per_step
    if not base:
        k = config.aux_timesteps_per_step or k
    # a super-resolution stage: its crops and augmentation levels
    sr_draws = {} if base else {"crop": config.aux_finetune_crop,
                                "max_level": config.aux_finetune_max_level}
    return train(
        backend, config, params, lr,
        draw=lambda: backend.draw(x0, generator, batch=k, stage=stage, **sr_draws),  # (t, ε, …)
        loss_at=lambda *drawn: backend.loss_at(x0, cond, *drawn, stage=stage),  # L(x0, e, θ)
        steps=steps, label="stage 2/3 fine-tune" if base else f"stage 2/3 fine-tune {stage}",
        quiet=quiet,
    )


def forgedit_blocks(name: str) -> bool:
    """The UNet weights Forgedit's joint stage trains: the down and up blocks but the first of
    each (its code's selection)."""
    return (name.startswith(("down_blocks.", "up_blocks."))
            and not name.startswith(("down_blocks.0.", "up_blocks.0.")))


def tune_jointly(
    backend: Backend,
    x0: torch.Tensor,
    e_tgt: TextCond,
    config: EditConfig,
    quiet: bool = False,
) -> tuple[TextCond, list[float]]:
    """Stages 1 and 2 as one (Forgedit): e, starting from e_tgt, and θ's `forgedit_blocks`
    minimize L(x0, e, θ) together, each at its own rate (embed_lr, finetune_lr), for
    finetune_steps steps. Returns e_opt; the trained weights stay in the backend until
    `Backend.take_delta`."""
    generator = torch.Generator("cpu").manual_seed(config.seed)
    e = e_tgt.map(lambda t: t.detach().float().clone().requires_grad_(True))
    params = backend.trainable_parameters("full", only=forgedit_blocks)
    if not params:
        _discard_finetune(backend)
        raise InputError(f"tuning 'forgedit' trains a UNet's down and up blocks; "
                         f"{backend.family}'s denoiser has none")
    groups = [{"params": list(e.tensors().values()), "lr": config.embed_lr},
              {"params": params, "lr": config.finetune_lr}]
    losses = train(
        backend, config, groups, config.finetune_lr,
        draw=lambda: backend.draw(x0, generator, batch=config.timesteps_per_step),  # (t, ε)
        loss_at=lambda t, noise: backend.loss_at(x0, e, t, noise),  # L(x0, e, θ), both trained
        steps=config.finetune_steps, label="stages 1-2/3 joint", quiet=quiet,
    )
    return e.map(lambda t: t.detach()), losses


def interpolate(e_tgt: TextCond, e_opt: TextCond, eta: float) -> TextCond:
    """Stage 3, first half: ē = η·e_tgt + (1−η)·e_opt (paper eq. 3). η = 0 reconstructs the
    input, η = 1 follows the target text; η > 1 extrapolates."""
    return e_opt.lerp(e_tgt, eta)


def vector_projection(e_tgt: TextCond, e_opt: TextCond, eta: float) -> TextCond:
    """Stage 3 as Forgedit's "vector projection" mixes the embeddings: ē = e_opt + η·e_⊥, with
    e_⊥ the part of e_tgt orthogonal to e_opt, per token over the channels (per row for a
    pooled embedding). η = 0 reconstructs the input; the part of e_tgt along e_opt, which
    would scale the input's own embedding, is left out. (Forgedit also scales e_opt by an
    identity weight swept around 1; here it is 1, so η = 0 is the input at every η grid.)"""
    def mix(tgt: torch.Tensor, opt: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(opt, dim=-1)
        along = (tgt * unit).sum(-1, keepdim=True) * unit
        return opt + eta * (tgt - along)
    tensors = e_tgt.tensors()
    return TextCond.from_tensors({k: mix(v, e_opt.tensors()[k]) for k, v in tensors.items()})


# EditConfig.interpolation -> ē(e_tgt, e_opt, η); "attention" (AID) works inside the UNet instead
INTERPOLATE = {"linear": interpolate, "vp": vector_projection}


@dataclass
class EditImage:
    """One output of stage 3."""

    eta: float
    seed: int
    image: Image.Image
    forget: str = "none"  # the forgetting strategy it was sampled with


# the EditConfig fields stage 3 can change per render
STAGE3_OPTIONS = ("guidance", "sample_steps", "sampler", "start", "interpolation",
                  "attention_warmup", "forget", "forget_strength")


def generate(
    backend: Backend,
    session: EditSession,
    etas: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    quiet: bool = False,
    **stage3,
) -> list[EditImage]:
    """Stage 3: sample with θ' = θ + delta at ē(η) for every (seed, η), in batches.

    Image (seed, η) starts from noise drawn by a generator seeded with `seed` alone, so the same
    seed gives the same starting noise at every η and in any batch (the arithmetic of another
    batch size can still move a pixel by a level; the same request renders bit for bit). With
    start "inversion" every image starts from x_T, the input's DDIM inversion under θ' and
    e_opt, instead, and a cascade's super-resolution stages each from their own inversion of
    the input at e_tgt (not in the paper). `stage3` overrides the session's STAGE3_OPTIONS (None:
    the session's); forgetting applies to θ' before anything is sampled or inverted, and
    forget "auto" renders every (seed, η) once per strategy of forgetting.candidates.
    """
    unknown = sorted(set(stage3) - set(STAGE3_OPTIONS))
    if unknown:
        raise TypeError(f"unknown stage 3 option(s): {', '.join(unknown)}")
    config = session.config
    config = replace(
        config,
        etas=tuple(config.etas if etas is None else etas),
        seeds=tuple(config.seeds if seeds is None else seeds),
        **{k: v for k, v in stage3.items() if v is not None},
    )  # replace() re-runs the checks on every stage 3 field
    session.check_model(backend)
    check_sample_steps(backend, config.sample_steps, config.sampler)
    check_stage3(backend, config)
    jobs = [(seed, eta) for seed in config.seeds for eta in config.etas]
    uncond = backend.encode_text([""])
    e_tgt = session.e_tgt.map(lambda t: t.to(backend.device))
    e_opt = session.e_opt.map(lambda t: t.to(backend.device))
    results: list[EditImage] = []
    strategies = candidates(session.delta) if config.forget == "auto" else [config.forget]
    if config.interpolation == "attention":  # the e_opt and e_tgt rows count toward the batch
        chunks = attention.batches(jobs, config.sample_batch)
    else:
        chunks = [jobs[i : i + config.sample_batch] for i in range(0, len(jobs),
                                                                    config.sample_batch)]
    bar = tqdm(total=len(jobs) * len(strategies), desc="stage 3/3 generate", unit="img",
               disable=quiet)
    for strategy in strategies:
        with backend.apply_delta(forget(backend, session.delta, strategy,
                                        config.forget_strength)):
            x_start, stage_start = None, None
            if config.start == "inversion":  # x_T such that DDIM at e_opt gives the input back
                x0 = backend.encode_image(session.input_image)
                x_start = backend.invert(x0, e_opt, config.sample_steps)
                stage_start = session.input_image  # each SR stage inverts it at e_tgt
            for chunk in chunks:
                results += [EditImage(eta, seed, image, strategy) for (seed, eta), image in
                            zip(chunk, sample(backend, chunk, e_tgt, e_opt, uncond, config,
                                              x_start, stage_start))]
                bar.update(len(chunk))
    bar.close()
    return results


def sample(backend: Backend, jobs, e_tgt: TextCond, e_opt: TextCond, uncond: TextCond, config,
           x_start=None, stage_start=None) -> list[Image.Image]:
    """One image per (seed, η) of `jobs`, mixed as config.interpolation says, under the
    weights the backend has now."""
    if config.interpolation == "attention":
        return attention.sample(backend, jobs, e_tgt, e_opt, uncond, config, x_start,
                                stage_start)
    mix = INTERPOLATE[config.interpolation]
    return backend.sample(
        TextCond.cat([mix(e_tgt, e_opt, eta) for _, eta in jobs]), uncond,
        [torch.Generator("cpu").manual_seed(seed) for seed, _ in jobs],
        config.sample_steps, config.guidance, sampler=config.sampler, x_start=x_start,
        stage_conds=TextCond.cat([e_tgt] * len(jobs)),  # super-resolution: e_tgt
        stage_start=stage_start,
    )


# --------------------------------------------------------------------------- the editor


class Imagic:
    """Runs the three stages on one backend.

    >>> editor = Imagic(load_backend("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    >>> session = editor.fit(Image.open("dog.png"), "a photo of a sitting dog")   # stages 1–2
    >>> images = editor.generate(session, etas=[0.6, 0.7, 0.8], seeds=[0, 1])      # stage 3
    >>> session.save("dog-sitting.imagic")   # re-render later without training
    """

    def __init__(self, backend: Backend, config: EditConfig | None = None, quiet: bool = False):
        self.backend = backend
        self.config = config or get_preset(backend.default_preset)
        self.quiet = quiet

    def fit(
        self, image: Image.Image, text: str, image_sha256: str | None = None, pad: bool = False
    ) -> EditSession:
        """Stages 1 and 2 on `image` for the target `text`; returns everything stage 3 needs."""
        # 1. Check inputs
        backend, config = self.backend, self.config  # EditConfig checked itself when made
        text = check_text(backend, text)
        check_sample_steps(backend, config.sample_steps, config.sampler)
        check_stage3(backend, config)
        check_size(image.size, min_side=min_side(backend.output_resolution))
        for stage in backend.auxiliary_stages:
            backend.check_aux_finetune(stage, config.aux_finetune_crop,
                                       config.aux_finetune_max_level)
        # 2. Bring the image to the model's resolution and space (x0) and encode the text (e_tgt)
        square = to_square(upright_rgb(image), backend.output_resolution, pad=pad)
        timings: dict[str, float] = {}
        with measured(timings, "encode", backend.device):
            x0 = backend.encode_image(square)
            e_tgt = backend.encode_text([text])
        # 3. Stage 1: optimize the text embedding (θ frozen); with Forgedit's tuning, the
        #    embedding and the UNet's blocks together (stages 1 and 2 in one)
        joint = config.tuning == "forgedit"
        with measured(timings, "stage1", backend.device):
            try:
                e_opt, losses1 = (tune_jointly if joint else optimize_embedding)(
                    backend, x0, e_tgt, config, self.quiet)
            except BaseException:  # the joint stage trains θ: give the base model back first
                if joint:
                    _discard_finetune(backend)
                raise
        # 4. Stage 2: fine-tune the model on e_opt (done, with joint tuning); cascades also
        #    fine-tune their super-resolution stages on e_tgt. take_delta() restores θ.
        with measured(timings, "stage2", backend.device):
            try:
                losses = {} if joint else {
                    "stage2": finetune(backend, x0, e_opt, config, quiet=self.quiet)}
                for stage in backend.auxiliary_stages:  # the input at the stage's resolution
                    x0_stage = backend.encode_image(square, stage)
                    losses[f"stage2_{stage}"] = finetune(backend, x0_stage, e_tgt, config,
                                                         stage=stage, quiet=self.quiet)
            except BaseException:  # out of memory, Ctrl-C, …: give the base model back first
                _discard_finetune(backend)
                raise
            delta = backend.take_delta()
        return EditSession(
            text=text,
            e_tgt=e_tgt.map(lambda t: t.detach().cpu()),
            e_opt=e_opt.map(lambda t: t.cpu()),
            delta=delta,
            config=config,
            model=dict(backend.identity),
            image_sha256=image_sha256 or image_hash(square),
            input_image=square,
            timings=timings,
            losses={"stage1": losses1, **losses},
        )

    def generate(
        self,
        session: EditSession,
        etas: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
        **stage3,
    ) -> list[EditImage]:
        """Stage 3 for a session made by `fit` or loaded with `EditSession.load`; `stage3`
        overrides the session's sampling, interpolation and forgetting (STAGE3_OPTIONS)."""
        with measured(session.timings, "generate", self.backend.device):
            images = generate(self.backend, session, etas, seeds, quiet=self.quiet, **stage3)
        return images


# --------------------------------------------------------------------------- helpers


def _discard_finetune(backend: Backend) -> None:
    """After a stage 2 that failed part way: remove its adapter or put θ back, so the loaded
    model is the base model again (take_delta does both; its delta is dropped)."""
    # it fails only when stage 2 failed before it changed anything: nothing to undo then
    with contextlib.suppress(Exception):
        backend.take_delta()


def check_stage3(backend: Backend, config) -> None:
    """Forgetting and attention interpolation work on a UNet's blocks and attention layers:
    refuse them for another denoiser before any training rather than after it."""
    if config.forget != "none":
        check_forgetting(backend, config.forget)  # "auto" too: its candidates are strategies
    if config.interpolation == "attention":
        attention.check_backend(backend)


def check_sample_steps(backend: Backend, steps: int, sampler: str) -> None:
    """A sampler's steps must stay on the model's noise schedule: say so before any training
    rather than after it, with the most steps that fit."""
    if backend.sample_steps_fit(steps, sampler):
        return
    most = min(steps, backend.train_timesteps)
    while most > 1 and not backend.sample_steps_fit(most, sampler):
        most -= 1
    raise InputError(f"{steps} {sampler} sampling steps: this model's schedule has "
                     f"{backend.train_timesteps} timesteps, and {most} steps is the most that "
                     "fit on it")


def check_text(backend: Backend, text: str) -> str:
    """`clean_text`, and a warning when the text is longer than the encoder reads (it is cut)."""
    text = clean_text(text)
    tokens = backend.count_text_tokens(text)
    if tokens > backend.max_text_tokens:
        warnings.warn(
            f"the text has {tokens} tokens; the encoder reads {backend.max_text_tokens}, "
            "so the end is cut",
            stacklevel=2,
        )
    return text


def clean_text(text: str) -> str:
    """The target text with invisible characters dropped (control and format characters such
    as zero-width spaces: the encoder would read them as noise) and its whitespace collapsed.
    A text that is not valid UTF-8, or has nothing visible, is refused. Needs no model, so the
    CLI calls it before loading one."""
    if not isinstance(text, str):
        raise InputError(f"the target text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the command line arrive as surrogates
        raise InputError("the target text is not valid UTF-8: check the terminal's encoding "
                         "or the file it came from") from None
    visible = " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
    if not visible:
        raise InputError("the target text is empty: say what the edited image should show")
    if visible != " ".join(text.split()):
        warnings.warn("the text's control or invisible characters were dropped", stacklevel=3)
    return visible


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()
