"""What the rectified-flow families (Stable Diffusion 3.x, FLUX.1) share: the flow-matching loss,
the timestep weighting of diffusers' training scripts, and Euler sampling of the flow ODE.

A rectified flow moves x0 along a straight line to noise: x_σ = (1 − σ)·x0 + σ·ε, σ in [0, 1],
and the transformer predicts the velocity v = dx/dσ = ε − x0 (Esser et al. 2024, "Scaling
Rectified Flow Transformers"). Imagic's loss (paper eq. 1) becomes
E_σ,ε ‖(ε − x0) − v_θ(x_σ, σ, e)‖², with σ drawn as diffusers' DreamBooth/LoRA scripts for SD3
and FLUX draw it (`compute_density_for_timestep_sampling`: an index into the scheduler's
training sigmas).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ModelError
from ..images import to_pil, to_tensor
from .base import TextCond
from .diffusers_unet import UNetBackend

TEXT_CACHE_SIZE = 8  # encodings kept per backend: "" and the texts of the current edit


class FlowBackend(UNetBackend):
    """The Backend protocol for a flow-matching transformer (SD3's MMDiT, FLUX's).

    UNetBackend's machinery (stage 2's Delta, LoRA through peft, restoring θ exactly, θ in bf16
    during stage 1) is generic over `self.unet`, so the transformer is held there: "unet" below
    means the denoiser, whatever its architecture. A family sets the timestep weighting and
    LoRA targets, and implements `encode_text`, `predict`, `flow_sigmas` and `load`.

    The T5 encoder (4.7B parameters in the real models) leaves the GPU after every encoding and
    returns only for the next new text; encodings are cached per text.
    """

    family = "flow"
    trained_parts = ("transformer",)
    prediction_type = "flow"
    # diffusers' training scripts: --weighting_scheme and its parameters (families override)
    weighting_scheme = "none"
    logit_mean, logit_std, mode_scale = 0.0, 1.0, 1.29
    classifier_free_guidance = True  # FLUX: a guidance embedding instead

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype,
                 t5_name: str, t5_tokens: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # UNetBackend builds DDPM/DDIM schedulers from the config it is given; a flow model has
        # neither, so it gets a plain 1000-step config here and the flow scheduler below.
        steps = pipe.scheduler.config.num_train_timesteps
        super().__init__(pipe.transformer, pipe.text_encoder, pipe.tokenizer,
                         {"num_train_timesteps": steps}, identity, device, dtype)
        self.pipe = pipe  # for its encode_prompt and latent packing, exactly as diffusers runs them
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.sampler_config = self.noise_scheduler.config
        self.prediction_type = "flow"
        self.train_timesteps = steps
        # the training schedule the scripts index into: σ (shifted for SD3) and t = 1000·σ
        self._train_sigmas = self.noise_scheduler.sigmas.to(device, torch.float32)
        self._train_timesteps = self.noise_scheduler.timesteps.to(device, torch.float32)
        self.vae = pipe.vae.to(device, self.frozen_dtype)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.t5_name = t5_name
        self.offloaded_parts = (t5_name,)  # T5 leaves the GPU after every encoding
        self.text_sequence_length = t5_tokens  # the pipeline's max_sequence_length for T5
        # the tokens the longest reader takes: T5's, or CLIP's where SD3 runs without T5
        has_t5 = getattr(pipe, t5_name, None) is not None
        self.max_text_tokens = t5_tokens if has_t5 else self.tokenizer.model_max_length
        for name in ("text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:  # T5 waits on the CPU between encodings (see _t5_on_device)
                module.to(self.device if name != t5_name else "cpu", self.frozen_dtype)
        for module in (self.vae, *self.text_encoders().values()):
            module.requires_grad_(False)
            module.eval()
        self._text_cache: dict[tuple[str, ...], TextCond] = {}
        self._sampler_noted = False

    # -- what a family provides ---------------------------------------------------------------

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by component name (those it has)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    def encode_prompts(self, texts: list[str]) -> TextCond:
        """The family's encode_prompt: e for `texts` (hidden states and pooled embedding)."""
        raise NotImplementedError

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        """The `steps` + 1 noise levels of stage 3, from 1 down to 0, as the family's pipeline
        sets them on its FlowMatchEulerDiscreteScheduler (with the model's shift)."""
        raise NotImplementedError

    def predict(self, stage, x_t, t, cond, extra=(), guidance: float | None = None):
        """v_θ(x_t, t, e): the transformer's velocity at timesteps t = 1000·σ (one per row)."""
        raise NotImplementedError

    # -- text -----------------------------------------------------------------------------

    def count_text_tokens(self, text: str) -> int:
        """T5's count: it reads the longest part of the text (the CLIP encoders read 77 tokens)."""
        tokenizer = getattr(self.pipe, self.t5_name.replace("text_encoder", "tokenizer"))
        if tokenizer is None:  # SD3 without T5: only CLIP reads the text
            return len(self.tokenizer(text, truncation=False).input_ids)
        return len(tokenizer(text, truncation=False).input_ids)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> TextCond:
        key = tuple(texts)
        if key not in self._text_cache:
            with self._t5_on_device():
                cond = self.encode_prompts(list(texts))
            if len(self._text_cache) >= TEXT_CACHE_SIZE:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[key] = cond.map(lambda t: t.float())
        return self._text_cache[key].map(torch.clone)  # callers may keep or change theirs

    @contextmanager
    def _t5_on_device(self) -> Iterator[None]:
        """T5 on the GPU for one encoding, back on the CPU after it (its memory freed for stages
        1–3). On the CPU it never moves."""
        t5 = getattr(self.pipe, self.t5_name, None)
        if t5 is None or self.device.type == "cpu":
            yield
            return
        t5.to(self.device)
        try:
            yield
        finally:
            t5.to("cpu")
            torch.cuda.empty_cache()

    # -- images ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        """x0 = (VAE latent mean − shift factor) × scaling factor, as the training scripts do."""
        self._stage_unet(stage)
        pixels = to_tensor(image).to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        config = self.vae.config
        return ((latents - (config.shift_factor or 0.0)) * config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        config = self.vae.config
        latents = x / config.scaling_factor + (config.shift_factor or 0.0)
        return to_pil(self.vae.decode(latents.to(self.vae.dtype)).sample)

    # -- the loss of stages 1 and 2 -----------------------------------------------------------

    def draw(self, x0, generator, batch=1, stage="base"):
        """(i, ε): indices into the training sigmas, drawn with the weighting of diffusers'
        scripts (u from `compute_density_for_timestep_sampling`, i = ⌊u·1000⌋), and ε."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        self._stage_unet(stage)
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, batch, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device="cpu", generator=generator)
        index = (u * self.train_timesteps).long().clamp(0, self.train_timesteps - 1)
        noise = torch.randn((batch, *x0.shape[1:]), generator=generator)
        return self._upload(index), self._upload(noise)

    def loss_at(self, x0, cond, t, noise, stage="base", extra=()):
        """mean w(σ)·‖(ε − x0) − v_θ(x_σ, σ, e)‖², x_σ = (1 − σ)·x0 + σ·ε; `t` holds indices into
        the training schedule. Gathers on the device only, so a CUDA graph can record it."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        self._settle()
        batch = t.shape[0]
        sigma = self._train_sigmas[t].view(-1, *([1] * (x0.dim() - 1)))
        x0 = x0.expand(batch, *x0.shape[1:])
        x_t = (1.0 - sigma) * x0 + sigma * noise
        target = noise - x0  # the velocity
        cond = cond.map(lambda v: v.expand(batch, *v.shape[1:]))
        with self._autocast(cache_enabled=False):
            prediction = self.predict(stage, x_t, self._train_timesteps[t], cond, extra)
        weight = compute_loss_weighting_for_sd3(self.weighting_scheme, sigma)  # 1 but sigma_sqrt
        return torch.mean(weight * (prediction.float() - target) ** 2)

    # -- stage 3: sampling the flow ODE -------------------------------------------------------

    @torch.no_grad()
    def sample(self, conds, uncond, generators, steps, guidance, progress=False, x0=None,
               strength=1.0, sampler="ddim", x_start=None, stage_conds=None, stage_start=None):
        """Euler steps of the flow ODE from σ = 1 to 0 (FlowMatchEulerDiscreteScheduler's step).
        Both samplers run it: Euler is what DDIM is on a rectified flow, and "dpm++" has no
        flow form here (a warning says so once)."""
        if x0 is not None and x_start is not None:
            raise ValueError("give x0 (SDEdit) or x_start (an inversion), not both")
        if sampler == "dpm++" and not self._sampler_noted:
            warnings.warn(f"{self.family} is a flow model: stage 3 samples with the flow Euler "
                          "solver (the flow form of DDIM), not DPM-Solver++", stacklevel=2)
            self._sampler_noted = True
        self._settle()
        sigmas = self.flow_sigmas(steps).to(self.device)
        n = len(generators)
        shape = (1, *self.latent_shape())
        start = 0
        if x_start is not None:  # the input's inversion: the generators are not used
            x = x_start.to(self.device, torch.float32).expand(n, *shape[1:]).clone()
        else:
            x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
            if x0 is not None:  # SDEdit (Meng et al. 2022) on the flow: x_σ from x0 at σ_start
                start = steps - max(1, round(steps * strength))
                x = (1.0 - sigmas[start]) * x0.expand(n, *shape[1:]) + sigmas[start] * x
        for i in tqdm(range(start, steps), desc="denoise", leave=False, disable=not progress):
            v = self.velocity(x, sigmas[i], conds, uncond, guidance)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return self.decode(x)

    def velocity(self, x, sigma, conds, uncond, guidance: float) -> torch.Tensor:
        """v at noise level σ for stage 3: classifier-free guided, v(∅) + w·(v(e) − v(∅)), where
        the family uses it (at w = 1 only v(e) runs); else the family's guidance embedding."""
        n = x.shape[0]
        t = (sigma * self.train_timesteps).expand(n)
        if not self.classifier_free_guidance or guidance == 1:
            with self._autocast():
                return self.predict("base", x, t, conds, guidance=guidance).float()
        both = TextCond.cat([uncond.map(lambda v: v.expand(n, *v.shape[1:])), conds])
        with self._autocast():
            prediction = self.predict("base", torch.cat([x, x]), torch.cat([t, t]), both).float()
        v_uncond, v_cond = prediction.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    def latent_shape(self) -> tuple[int, ...]:
        """x0's shape without the batch: the VAE's latent of a `resolution`² image."""
        side = self.resolution // self.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    def sample_steps_fit(self, steps: int, sampler: str) -> bool:
        """Any number of steps up to the training schedule's length: the flow scheduler spaces
        its noise levels evenly over [0, 1] for any count."""
        return 1 <= steps <= self.train_timesteps

    @torch.no_grad()
    def invert(self, x0, cond, steps):
        """x at σ = 1: the Euler steps of `sample` run backwards from x0 on the same noise
        levels, each velocity taken at the point already reached (as DDIM inversion does),
        conditioned on `cond` without classifier-free guidance."""
        self._settle()
        sigmas = self.flow_sigmas(steps).to(self.device)
        x = x0.to(self.device, torch.float32)
        for i in reversed(range(steps)):
            with self._autocast():
                v = self.predict("base", x, (sigmas[i + 1] * self.train_timesteps).expand(
                    x.shape[0]), cond).float()
            x = x + (sigmas[i] - sigmas[i + 1]) * v
        return x

    # -- information ----------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        counts = {"transformer": _count(self.unet)}
        counts |= {name: _count(m) for name, m in self.text_encoders().items()}
        return counts | {"vae": _count(self.vae)}

    def info(self) -> dict:
        channels, side, _ = self.latent_shape()
        return {
            "family": self.family,
            "source": self.identity.get("source"),
            "revision": self.identity.get("revision"),
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "transformer_input": f"{channels}×{side}²",
            "text_tokens": self.max_text_tokens,
            "text_embedding": self.unet.config.joint_attention_dim,
            "parameters": self.parameter_counts(),
            "stage2_gpu_gb": self.stage2_memory(),
        }


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_flow_pipeline(pipeline_class, transformer_class, what: str, required: Sequence[str],
                       model: str, allow_pickle: bool, config: str | None,
                       revision: str | None):
    """(pipeline, identity) of a flow family, loaded as diffusers loads it and checked: every
    component in `required`, and a transformer of the family's class; one line otherwise."""
    from .stable_diffusion import load_pipeline

    check_folder(model, required, what)
    pipe, identity = load_pipeline(pipeline_class, what, model, allow_pickle, config, revision)
    check_transformer(pipe, transformer_class, what, identity["source"])
    require_components(pipe, required, what, identity["source"])
    return pipe, identity


def check_transformer(pipe, expected: type, what: str, source: str) -> None:
    """A pipeline whose model_index.json names one family but whose transformer is another's
    (a copied or hand-edited folder) fails here, in one line, rather than deep in a forward."""
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, expected):
        found = type(transformer).__name__ if transformer is not None else "no transformer"
        raise ModelError(f"{source} is not {what} model: its transformer is {found}, "
                         f"not {expected.__name__}")


def check_folder(model: str, names: Sequence[str], what: str) -> None:
    """A local diffusers folder must have every component in `names` (listed in
    model_index.json, with its subfolder): one line naming the first it lacks, before diffusers
    fails with a longer message that does not name it."""
    import json

    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        return  # a hub id or a single file: load_pipeline reports problems itself
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return
    for name in names:
        entry = index.get(name)
        if not entry or entry[0] is None or not (path / name).is_dir():
            raise ModelError(f"{path} has no {name}, which {what} model needs: use a complete "
                             "diffusers folder of the model")


def require_components(pipe, names: Sequence[str], what: str, source: str) -> None:
    """One line naming the first component the pipeline lacks (a folder without it)."""
    for name in names:
        if getattr(pipe, name, None) is None:
            raise ModelError(f"{source} has no {name}, which {what} model needs: use a complete "
                             "diffusers folder of the model")


# Pipeline classes of model_index.json ("_class_name") per family, and the single-file keys of
# diffusers' CHECKPOINT_KEY_NAMES that mark them.
PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def flow_family(model: str, config: str | None = None, revision: str | None = None) -> str | None:
    """"sd3" or "flux" when `model` (or, for a single file, its --config folder) is one of these
    families, None otherwise (Stable Diffusion 1/2, or not found: its loader says why)."""
    import json

    path = Path(model).expanduser()
    index = None
    if path.is_file():
        if config is not None:
            index = Path(config).expanduser() / "model_index.json"
        else:
            return _single_file_family(path)
    elif path.is_dir():
        index = path / "model_index.json"
    if index is not None:
        try:
            return PIPELINES.get(json.loads(index.read_text()).get("_class_name"))
        except (OSError, ValueError, AttributeError):
            return None
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return None
    try:  # a hub id: its model_index.json from the cache, or the hub when online
        from diffusers import DiffusionPipeline

        with warnings.catch_warnings():  # diffusers' deprecation notes: not the user's concern
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(model, revision=revision)
        return PIPELINES.get(index.get("_class_name"))
    except Exception:  # offline, not found, …: the Stable Diffusion loader gives the one line
        return None


def _single_file_family(path: Path) -> str | None:
    """The family of a .safetensors checkpoint from its tensor names, by the keys diffusers'
    single-file loader recognises them by."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not a safetensors file: the Stable Diffusion loader says so
        return None
    if keys & {*CHECKPOINT_KEY_NAMES["sd3"], *CHECKPOINT_KEY_NAMES["sd35_large"]}:
        return "sd3"
    newer = [k for name in ("flux2", "flux3") for k in CHECKPOINT_KEY_NAMES.get(name, [])]
    if keys & set(CHECKPOINT_KEY_NAMES["flux"]) and not keys & set(newer):
        return "flux"
    return None


__all__ = ["FlowBackend", "flow_family"]
