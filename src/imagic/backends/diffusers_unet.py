"""What every diffusers-UNet family shares: the loss, stage 2's weights, and the sampler.

A family subclasses `UNetBackend` and says how an image enters and leaves the UNet's space
(`encode_image`, `decode`): through a VAE for Stable Diffusion, as pixels for the ShapesWorld
model and other Imagen-style cascades.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ModelError
from ..presets import SAMPLERS
from .base import Delta, TextCond

# The attention projections that diffusers' LoRA training scripts adapt.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "imagic"


class UNetBackend:
    """The Backend protocol (base.py) for a `UNet2DConditionModel` with a CLIP text encoder.

    θ (the UNet) stays in float32 so stage 2 trains fp32 weights; on CUDA the frozen text encoder
    (and a family's other frozen parts) are cast to `dtype` (bf16 by default) and the UNet runs
    under autocast.
    """

    family = "unet"
    default_preset = "paper"  # presets.py
    auxiliary_stages: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = LORA_TARGETS  # the Linear layers a LoRA stage 2 adapts
    # whether x0 lies in [-1, 1] (pixels), so DDIM may clip its prediction there as the config
    # says; a latent model's does not, and DDIM never clips it (as diffusers' SD pipeline does)
    bounded_samples = True

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config, identity: dict,
                 device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.identity = dict(identity, family=self.family)
        self.device, self.dtype = device, dtype
        self.frozen_dtype = dtype if device.type == "cuda" else torch.float32
        self.unet.to(device, torch.float32)
        self.text_encoder.to(device, self.frozen_dtype)
        for module in (self.unet, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # The training loss draws x_t with the model's own noise schedule (DDPM form); sampling
        # uses DDIM on the same betas (the paper's 50 DDIM steps).
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        latent = {} if self.bounded_samples else {"clip_sample": False}
        self.sampler_config = DDIMScheduler.from_config(scheduler_config, **latent).config
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"prediction type {self.prediction_type!r} is not supported")
        self.max_text_tokens = tokenizer.model_max_length
        self.train_timesteps = self.noise_scheduler.config.num_train_timesteps
        # Per stage that stage 2 is training: ("full", θ before it) or ("lora", the rank)
        self._trained: dict[str, tuple[str, object]] = {}
        self._fp32_copies: dict[str, torch.Tensor] | None = None  # θ while stage 1 holds it in bf16
        self._in_low_precision = False

    # -- what a family provides -------------------------------------------------------------

    resolution: int

    @property
    def output_resolution(self) -> int:
        """Pixels of the square images the model makes: the last stage's resolution."""
        return self.stage_resolution((*self.stage_unets(),)[-1])

    def stage_resolution(self, stage: str) -> int:
        """Pixels of the square image `stage` works at."""
        self._stage_unet(stage)
        return self.resolution

    def stage_unets(self) -> dict[str, torch.nn.Module]:
        """Every stage's UNet in sampling order: the base model's ("base"), then a cascade's
        super-resolution stages."""
        return {"base": self.unet}

    def _stage_unet(self, stage: str) -> torch.nn.Module:
        unets = self.stage_unets()
        if stage not in unets:
            raise ValueError(f"{self.family} has no stage {stage!r}")
        return unets[stage]

    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        """The UNet's space → images."""
        raise NotImplementedError

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the UNet reads besides x_t (none here; the ShapesWorld model adds coordinates)."""
        return x

    def predict(self, stage: str, x_t: torch.Tensor, t, cond: TextCond,
                extra: tuple = ()) -> torch.Tensor:
        """f_θ(x_t, t, e) of `stage`'s UNet, e one row per row of x_t; `extra` is what a
        super-resolution stage also reads (backends/cascade.py). A family whose UNet reads
        more of e (SDXL's pooled embedding) overrides this."""
        return self.unet(self.unet_input(x_t), t, encoder_hidden_states=cond.hidden_states).sample

    # -- helpers ----------------------------------------------------------------------------

    def _upload(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU tensor onto the device. To a GPU through pinned memory without blocking: a plain
        copy from pageable memory waits for the GPU to finish its queue, once per step."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _autocast(self, cache_enabled: bool = True):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled,
                              cache_enabled=cache_enabled)

    def _lora_config(self, rank: int):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=list(self.lora_targets))

    # -- text -------------------------------------------------------------------------------

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> TextCond:
        ids = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_text_tokens,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return TextCond(self.text_encoder(ids)[0].float())

    # -- the loss of stages 1 and 2 -----------------------------------------------------------

    def loss(self, x0, cond, generator, batch=1, stage="base"):
        return self.loss_at(x0, cond, *self.draw(x0, generator, batch, stage), stage=stage)

    def draw(self, x0, generator, batch=1, stage="base"):
        # Drawn on the CPU generator, then moved: one seed gives the same t and ε on any device.
        steps = self.noise_scheduler.config.num_train_timesteps
        t = self._upload(torch.randint(0, steps, (batch,), generator=generator))
        noise = self._upload(torch.randn((batch, *x0.shape[1:]), generator=generator))
        return t, noise

    def loss_at(self, x0, cond, t, noise, stage="base", extra=()):
        self._settle()
        batch = t.shape[0]
        x0 = x0.expand(batch, -1, -1, -1)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        cond = cond.map(lambda v: v.expand(batch, *v.shape[1:]))
        # no autocast weight cache, as PyTorch's CUDA-graph tools require (make_graphed_callables
        # refuses it); each weight is cast once per forward pass either way
        with self._autocast(cache_enabled=False):
            prediction = self.predict(stage, x_t, t, cond, extra)
        return F.mse_loss(prediction.float(), target)

    # -- stage 2: which weights train, and getting them back out -------------------------------

    def trainable_parameters(self, mode, lora_rank=4, stage="base", only=None):
        unet = self._stage_unet(stage)
        self._settle()
        if mode == "lora":
            unet.add_adapter(self._lora_config(lora_rank), adapter_name=ADAPTER)
            self._trained[stage] = ("lora", lora_rank)
            return [p for p in unet.parameters() if p.requires_grad]
        self._trained[stage] = ("full", _host_copies(dict(unet.named_parameters())))
        for name, p in unet.named_parameters():
            p.requires_grad_(only is None or only(name))
        return [p for p in unet.parameters() if p.requires_grad]

    def take_delta(self) -> Delta:
        """Every trained stage's weights in one Delta (a super-resolution stage's tensor names
        start with "STAGE/"), each stage put back as it was loaded."""
        from peft.utils import get_peft_model_state_dict

        if not self._trained:
            raise RuntimeError("no stage was fine-tuned")
        kinds = {kind for kind, _ in self._trained.values()}
        delta = Delta(kinds.pop() if len(kinds) == 1 else "mixed")
        for stage, unet in self.stage_unets().items():
            if stage not in self._trained:
                continue
            kind, saved = self._trained.pop(stage)
            prefix = stage_prefix(stage)
            if kind == "lora":  # the adapter's weights, then remove the adapter
                tensors = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
                delta.tensors |= {prefix + k: v.detach().cpu().clone()
                                  for k, v in tensors.items()}
                delta.lora_rank = saved
                unet.unload_lora()
            else:  # full: the tensors that changed, then restore θ exactly
                params = dict(unet.named_parameters())
                with torch.no_grad():
                    for name, now in _host_copies(params).items():
                        if not torch.equal(now, saved[name]):
                            delta.tensors[prefix + name] = now
                            params[name].copy_(saved[name], non_blocking=True)
                _wait_for(self.device)  # the backup may be freed only once it is copied back
            unet.requires_grad_(False)
        if delta.kind == "mixed":
            raise RuntimeError("stages were fine-tuned in different modes")
        return delta

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        # diffusers checkpoints whenever gradients are enabled, in eval mode too
        for unet in self.stage_unets().values():
            if enabled:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()

    @contextmanager
    def frozen_in_low_precision(self) -> Iterator[None]:
        # Stage 1 trains e only. Under autocast a fp32 θ costs its 4 bytes per weight plus the
        # low-precision copy of every weight that the backward pass keeps; held in low precision
        # (bf16 by default), θ costs 2 bytes per weight and the copies vanish (SD-1.5: 3.4 GB
        # less). The fp32 values wait in pinned host memory and are copied back: casting back
        # would keep the rounding.
        if self.frozen_dtype == torch.float32:
            yield  # float32 compute (the CPU, or --dtype float32): nothing to gain
            return
        self._settle()
        params = dict(self.unet.named_parameters())
        self._fp32_copies = _host_copies(params)
        self._in_low_precision = True
        try:
            with torch.no_grad():
                for p in params.values():
                    p.data = p.data.to(self.frozen_dtype)
            yield
        finally:
            self._in_low_precision = False
            # If stage 1 ran out of memory, its activations are not freed yet and the restore
            # can run out too: then the next call into the backend finishes it (`_settle`).
            with suppress(torch.OutOfMemoryError):
                self._restore_fp32()

    def _settle(self) -> None:
        """Finish putting back the fp32 θ when an error in stage 1 left that pending. Every
        entry point that runs or changes the UNet starts with it."""
        if self._fp32_copies is not None and not self._in_low_precision:
            self._restore_fp32()

    def _restore_fp32(self) -> None:
        """Put back the fp32 θ that `frozen_in_low_precision` parked, if any is still parked."""
        saved = self._fp32_copies
        if saved is None:
            return
        with torch.no_grad():
            for name, p in self.unet.named_parameters():
                if name in saved and p.dtype != torch.float32:
                    p.data = torch.empty_like(p.data, dtype=torch.float32)  # same layout
                    p.data.copy_(saved[name], non_blocking=True)
        _wait_for(self.device)  # the host copies may be freed only once they are copied back
        self._fp32_copies = None

    @contextmanager
    def apply_delta(self, delta: Delta) -> Iterator[None]:
        self._settle()
        unets = self.stage_unets()
        by_stage: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in delta.tensors.items():
            stage, _, local = name.rpartition("/")
            by_stage.setdefault(stage or "base", {})[local] = value
        unknown = sorted(set(by_stage) - set(unets))
        if unknown:
            raise ModelError(f"the session's weights are for a stage {unknown[0]!r} this model "
                             "does not have")
        with ExitStack() as stack:
            for stage, tensors in by_stage.items():
                apply = _apply_lora if delta.kind == "lora" else _apply_full
                stack.enter_context(apply(self, unets[stage], tensors, delta.lora_rank))
            yield

    def delta_shapes(self, kind: str, lora_rank: int = 0) -> dict[str, tuple[int, ...]]:
        if kind not in ("full", "lora"):
            raise ValueError(f"unknown delta kind {kind!r}")
        shapes = {}
        for stage, unet in self.stage_unets().items():
            prefix = stage_prefix(stage)
            if kind == "full":
                shapes |= {prefix + name: tuple(p.shape) for name, p in unet.named_parameters()}
                continue
            # What peft's add_adapter makes for `_lora_config` (A: rank×in, B: out×rank on every
            # targeted Linear), named as get_peft_model_state_dict names it, without adding one
            for name, module in unet.named_modules():
                targeted = any(name == t or name.endswith(f".{t}") for t in self.lora_targets)
                if targeted and isinstance(module, torch.nn.Linear):
                    shapes[f"{prefix}{name}.lora_A.weight"] = (lora_rank, module.in_features)
                    shapes[f"{prefix}{name}.lora_B.weight"] = (module.out_features, lora_rank)
        return shapes

    # -- stage 3: sampling ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, conds, uncond, generators, steps, guidance, progress=False, x0=None,
               strength=1.0, sampler="ddim", x_start=None, stage_conds=None, stage_start=None):
        return self.decode(self.sample_base(conds, uncond, generators, steps, guidance, progress,
                                            x0, strength, sampler, x_start))

    def noise_shape(self) -> tuple[int, ...]:
        """The shape of one image's starting noise in the base UNet's space."""
        size = self.unet.config.sample_size
        return (1, self.unet.config.out_channels, size, size)

    @torch.no_grad()
    def sample_base(self, conds, uncond, generators, steps, guidance, progress=False, x0=None,
                    strength=1.0, sampler="ddim", x_start=None) -> torch.Tensor:
        """Stage 3 on the base model: `sample` before decoding (the UNet's space)."""
        if x0 is not None and x_start is not None:
            raise ValueError("give x0 (SDEdit) or x_start (an inversion), not both")
        self._settle()
        scheduler = make_sampler(sampler, self.sampler_config)
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps
        n = len(generators)
        shape = self.noise_shape()
        if x_start is not None:  # the input's inversion: the generators are not used
            x = x_start.to(self.device, torch.float32).expand(n, -1, -1, -1).clone()
        else:
            x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
            if x0 is None:
                x = x * scheduler.init_noise_sigma
            else:  # SDEdit (Meng et al. 2022): noise x0 to the strength's timestep, denoise
                timesteps = timesteps[steps - max(1, round(steps * strength)):]
                x = scheduler.add_noise(x0.expand(n, -1, -1, -1), x, timesteps[:1].repeat(n))
        return self.denoise("base", scheduler, x, timesteps, conds, uncond, guidance, progress)

    def denoise(self, stage: str, scheduler, x: torch.Tensor, timesteps, conds: TextCond,
                uncond: TextCond, guidance: float, progress: bool = False,
                extra: tuple = (), correct=None) -> torch.Tensor:
        """The sampler's loop for `stage` from x, classifier-free guided: ε̂ = ε(∅) + w·(ε(e) −
        ε(∅)); at guidance 1 that is ε(e), and the unconditional half is not run. With
        `correct` (x̂0 → x̂0), every step's guided prediction is replaced by the one whose
        predicted clean image is `correct` of its own."""
        n = x.shape[0]
        guided = guidance != 1
        if guided:
            conds = TextCond.cat([uncond.map(lambda v: v.expand(n, *v.shape[1:])), conds])
            extra = tuple(torch.cat([e, e]) for e in extra)
        for t in tqdm(timesteps, desc="denoise", leave=False, disable=not progress):
            model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            with self._autocast():
                prediction = self.predict(stage, model_input, t, conds, extra).float()
            if guided:
                uncond_pred, cond_pred = prediction.chunk(2)
                prediction = uncond_pred + guidance * (cond_pred - uncond_pred)
            if correct is not None:
                prediction = self.corrected(prediction, x, t, correct)
            x = scheduler.step(prediction, t, x).prev_sample
        return x

    def corrected(self, prediction: torch.Tensor, x_t: torch.Tensor, t,
                  correct) -> torch.Tensor:
        """The ε or v prediction at (x_t, t) whose predicted x0 is `correct` of `prediction`'s
        (x_t = √ᾱ·x0 + √(1−ᾱ)·ε, v = √ᾱ·ε − √(1−ᾱ)·x0)."""
        alpha = self.noise_scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
        a, b = alpha.sqrt(), (1 - alpha).sqrt()
        if self.prediction_type == "epsilon":
            x0 = (x_t - b * prediction) / a
        else:
            x0 = a * x_t - b * prediction
        x0 = correct(x0)
        return (x_t - a * x0) / b if self.prediction_type == "epsilon" else (a * x_t - x0) / b

    def sample_steps_fit(self, steps: int, sampler: str) -> bool:
        """Whether `steps` steps of `sampler` stay on the model's schedule, each at its own
        timestep: a step offset can push the last to num_train_timesteps itself, one past the
        end, and near the schedule's length some spacings repeat timesteps."""
        if not 1 <= steps <= self.train_timesteps:
            return False
        scheduler = make_sampler(sampler, self.sampler_config)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.tolist()
        return (max(timesteps) < self.train_timesteps and min(timesteps) >= 0
                and len(set(timesteps)) == len(timesteps))

    @torch.no_grad()
    def invert(self, x0, cond, steps, stage="base", extra=(), sampler_config=None):
        """DDIM inversion of x0 on `stage` (a cascade's super-resolution stage reads `extra`
        beside x_t, and may keep its own `sampler_config`; default: the model's)."""
        from diffusers import DDIMInverseScheduler

        self._settle()
        config = self.sampler_config if sampler_config is None else sampler_config
        accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters
        scheduler = DDIMInverseScheduler.from_config(  # the model's schedule, run upwards
            {k: v for k, v in config.items() if k in accepted})
        try:
            scheduler.set_timesteps(steps, device=self.device)
        except ValueError as err:  # e.g. timestep_spacing "linspace", which it does not run
            raise ModelError(f"this model's noise schedule cannot be inverted by DDIM ({err}); "
                             "start from noise instead (--start noise)") from None
        x = x0.to(self.device, torch.float32)
        for t in scheduler.timesteps:
            with self._autocast():
                prediction = self.predict(stage, x, t, cond, extra)
            x = scheduler.step(prediction.float(), t, x).prev_sample
        return x

    # -- information ----------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        return {"unet": _count(self.unet), "text_encoder": _count(self.text_encoder)}

    # the parameter_counts() entries stage 2 trains, and those that wait in host memory
    trained_parts: tuple[str, ...] = ("unet",)
    offloaded_parts: tuple[str, ...] = ()

    def stage2_memory(self) -> dict[str, float]:
        """GB that stage 2 holds on a GPU before activations, per mode: the trained weights in
        fp32 (θ trains in fp32), for a full fine-tune with their gradients and two Adam states
        (16 bytes a weight; a LoRA adapter's are a few MB), and the frozen parts in bf16."""
        counts = self.parameter_counts()
        trained = sum(n for name, n in counts.items()
                      if name in self.trained_parts or name in self.auxiliary_stages)
        frozen = sum(counts.values()) - trained - sum(
            counts.get(name, 0) for name in self.offloaded_parts)
        return {"full": round((16 * trained + 2 * frozen) / 1e9, 2),
                "lora": round((4 * trained + 2 * frozen) / 1e9, 2)}

    def info(self) -> dict:
        return {
            "family": self.family,
            "source": self.identity.get("source"),
            "revision": self.identity.get("revision"),
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "unet_input": f"{self.unet.config.in_channels}×{self.unet.config.sample_size}²",
            "text_tokens": self.max_text_tokens,
            "text_embedding": self.text_encoder.config.hidden_size,
            "parameters": self.parameter_counts(),
            "stage2_gpu_gb": self.stage2_memory(),
        }


def stage_prefix(stage: str) -> str:
    """How a Delta names a stage's tensors: the base model's as they are, a super-resolution
    stage's as "STAGE/name"."""
    return "" if stage == "base" else f"{stage}/"


@contextmanager
def _apply_full(backend: UNetBackend, unet, tensors: dict[str, torch.Tensor],
                rank: int) -> Iterator[None]:
    """`unet` with the delta's trained values in place of its own, put back afterwards."""
    params = dict(unet.named_parameters())
    # copy_ would broadcast a tensor of another shape: refuse it (EditSession checks first)
    unfit = sorted(name for name, value in tensors.items()
                   if name not in params or value.shape != params[name].shape)
    if unfit:
        raise ModelError(f"the session's weights do not fit this UNet (e.g. {unfit[0]})")
    saved = _host_copies({name: params[name] for name in tensors})
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value, non_blocking=True)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value, non_blocking=True)
        _wait_for(backend.device)


@contextmanager
def _apply_lora(backend: UNetBackend, unet, tensors: dict[str, torch.Tensor],
                rank: int) -> Iterator[None]:
    """`unet` with the delta's LoRA adapter, removed afterwards."""
    from peft import set_peft_model_state_dict

    # add_adapter draws starting weights (replaced at once) from the global generator: leave
    # the caller's random state as it was
    with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda"
                               else []):
        unet.add_adapter(backend._lora_config(rank), adapter_name=ADAPTER)
    set_peft_model_state_dict(unet, tensors, adapter_name=ADAPTER)
    unet.requires_grad_(False)
    try:
        yield
    finally:
        unet.unload_lora()


def make_sampler(name: str, config):
    """A fresh diffusers scheduler for stage 3, on the model's own noise schedule: "ddim" (the
    paper's sampler, deterministic) or "dpm++" (DPMSolverMultistepScheduler, DPM-Solver++ 2M,
    Lu et al. 2022, deterministic; diffusers' recommended fast solver for Stable Diffusion)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def _host_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of (GPU) tensors. From a GPU into pinned memory without blocking, then one
    wait: a pageable copy, tensor by tensor, is several times slower for a UNet's weights
    (docs/PERFORMANCE.md). A GPU can copy pinned copies back without blocking too."""
    copies = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.is_cuda:
            copies[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            copies[name].copy_(t, non_blocking=True)
        else:
            copies[name] = t.to("cpu", copy=True)
    for device in {t.device for t in tensors.values() if t.is_cuda}:
        _wait_for(device)
    return copies


def _wait_for(device: torch.device) -> None:
    """Wait for the copies queued on a GPU (none to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A short content hash of a model's weights: names, shapes and 64 evenly spaced values of
    every tensor. Cheap (no full pass over gigabytes) yet different for any two real models, and
    the same wherever the files live."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().flatten()
            step = max(1, flat.numel() // 64)
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(flat[::step][:64].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
