"""Stable Diffusion 1.x / 2.x through diffusers: latent diffusion with a CLIP text encoder.

x0 is the VAE latent mean × the VAE's scaling factor; e is the CLIP last hidden state (77×768 for
SD 1.x); the target of the loss is ε or v as the scheduler config says (SD 2.x 768 is v).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ModelError
from ..images import to_pil, to_tensor
from .base import Delta, TextCond

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
# The attention projections that diffusers' LoRA training scripts adapt.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "imagic"


class StableDiffusionBackend:
    """The Backend protocol (base.py) for a diffusers StableDiffusionPipeline's components.

    θ (the UNet) stays in float32 so stage 2 trains fp32 weights; on CUDA the frozen VAE and text
    encoder are cast to `dtype` (bf16 by default) and the UNet runs under bf16 autocast.
    """

    family = "stable-diffusion"
    auxiliary_stages: tuple[str, ...] = ()

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, DDPMScheduler

        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.identity = dict(identity, family=self.family)
        self.device, self.dtype = device, dtype
        frozen_dtype = dtype if device.type == "cuda" else torch.float32
        self.unet.to(device, torch.float32)
        self.vae.to(device, frozen_dtype)
        self.text_encoder.to(device, frozen_dtype)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # The training loss draws x_t with the model's own noise schedule (DDPM form); sampling
        # uses DDIM on the same betas (the paper's 50 DDIM steps).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sampler_config = DDIMScheduler.from_config(pipe.scheduler.config).config
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"prediction type {self.prediction_type!r} is not supported")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor
        self.max_text_tokens = self.tokenizer.model_max_length
        self._backup: dict[str, torch.Tensor] | None = None  # θ before stage 2 (full mode)

    # -- helpers ----------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _lora_config(self, rank: int):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=list(LORA_TARGETS))

    # -- text and image ---------------------------------------------------------------------

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> TextCond:
        ids = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_text_tokens,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        return TextCond(self.text_encoder(ids)[0].float())

    @torch.no_grad()
    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        pixels = to_tensor(image).to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).float()

    # -- the loss of stages 1 and 2 -----------------------------------------------------------

    def loss(self, x0, cond, generator, batch=1, stage="base"):
        # Draws on the CPU generator, then moved: the same seed gives the same t and ε on any device.
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator).to(self.device)
        noise = torch.randn((batch, *x0.shape[1:]), generator=generator).to(self.device)
        x0 = x0.expand(batch, -1, -1, -1)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        hidden = cond.hidden_states.expand(batch, -1, -1)
        with self._autocast():
            prediction = self.unet(x_t, t, encoder_hidden_states=hidden).sample
        return F.mse_loss(prediction.float(), target)

    # -- stage 2: which weights train, and getting them back out -------------------------------

    def trainable_parameters(self, mode, lora_rank=4, stage="base"):
        if stage != "base":
            raise ValueError(f"Stable Diffusion has no stage {stage!r}")
        if mode == "lora":
            self.unet.add_adapter(self._lora_config(lora_rank), adapter_name=ADAPTER)
            params = [p for p in self.unet.parameters() if p.requires_grad]
            for p in params:  # LoRA weights train in fp32 whatever the frozen dtype
                p.data = p.data.float()
            self._lora_rank = lora_rank
            return params
        self._backup = {n: p.detach().to("cpu", copy=True) for n, p in self.unet.named_parameters()}
        self.unet.requires_grad_(True)
        return list(self.unet.parameters())

    def take_delta(self) -> Delta:
        from peft.utils import get_peft_model_state_dict

        if self._backup is None:  # LoRA: the adapter's weights, then remove the adapter
            tensors = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
            delta = Delta("lora", {k: v.detach().cpu().clone() for k, v in tensors.items()},
                          lora_rank=self._lora_rank)
            self.unet.unload_lora()
        else:  # full: the tensors that changed, then restore θ exactly
            delta = Delta("full")
            for name, p in self.unet.named_parameters():
                before = self._backup[name]
                now = p.detach().cpu()
                if not torch.equal(now, before):
                    delta.tensors[name] = now.clone()
                    p.data.copy_(before)
            self._backup = None
        self.unet.requires_grad_(False)
        return delta

    @contextmanager
    def apply_delta(self, delta: Delta) -> Iterator[None]:
        from peft import set_peft_model_state_dict

        if delta.kind == "lora":
            self.unet.add_adapter(self._lora_config(delta.lora_rank), adapter_name=ADAPTER)
            set_peft_model_state_dict(self.unet, delta.tensors, adapter_name=ADAPTER)
            self.unet.requires_grad_(False)
            try:
                yield
            finally:
                self.unet.unload_lora()
            return
        params = dict(self.unet.named_parameters())
        unknown = sorted(set(delta.tensors) - set(params))
        if unknown:
            raise ModelError(f"the session's weights do not fit this UNet (e.g. {unknown[0]})")
        saved = {name: params[name].detach().to("cpu", copy=True) for name in delta.tensors}
        with torch.no_grad():
            for name, value in delta.tensors.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # -- stage 3: sampling ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, conds, uncond, generators, steps, guidance, progress=False):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.sampler_config)
        scheduler.set_timesteps(steps, device=self.device)
        n = len(generators)
        size = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, size, size)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        latents = latents * scheduler.init_noise_sigma
        hidden = torch.cat([uncond.hidden_states.expand(n, -1, -1), conds.hidden_states])
        for t in tqdm(scheduler.timesteps, desc="denoise", leave=False, disable=not progress):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with self._autocast():
                prediction = self.unet(model_input, t, encoder_hidden_states=hidden).sample
            uncond_pred, cond_pred = prediction.float().chunk(2)
            guided = uncond_pred + guidance * (cond_pred - uncond_pred)
            latents = scheduler.step(guided, t, latents).prev_sample
        latents = latents / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents.to(self.vae.dtype)).sample
        return to_pil(pixels)

    # -- information ----------------------------------------------------------------------

    def info(self) -> dict:
        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        return {
            "family": self.family,
            "source": self.identity.get("source"),
            "revision": self.identity.get("revision"),
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "latent": f"{self.unet.config.in_channels}×{self.unet.config.sample_size}²",
            "text_tokens": self.max_text_tokens,
            "text_embedding": self.text_encoder.config.hidden_size,
            "parameters": {
                "unet": count(self.unet),
                "text_encoder": count(self.text_encoder),
                "vae": count(self.vae),
            },
        }


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


def load_stable_diffusion(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    config: str | None = None,
    revision: str | None = None,
) -> StableDiffusionBackend:
    """Load SD 1.x/2.x from a hub id, a local diffusers folder, or one .safetensors file."""
    from diffusers import StableDiffusionPipeline

    common = dict(safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
    path = Path(model).expanduser()
    identity = {"source": model, "revision": revision}
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(
                f"{path.name} is a pickled checkpoint, and loading one can run arbitrary code: "
                "use a .safetensors file, or pass --allow-pickle if you trust its source"
            )
        if suffix not in PICKLE_SUFFIXES + (".safetensors",):
            raise ModelError(f"{path} is not a model checkpoint (.safetensors expected)")
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=config, local_files_only=config is not None, **common
            )
        except Exception as err:  # diffusers raises many kinds here; the user needs one line
            hint = "" if config else "; offline it needs --config DIR (a diffusers folder of the same model)"
            raise ModelError(f"could not load {path.name} as a Stable Diffusion checkpoint{hint} ({_short(err)})") from None
        identity["file_size"] = path.stat().st_size
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path), use_safetensors=None if allow_pickle else True, **common
            )
        except Exception as err:
            raise ModelError(f"could not load {path}: {_loader_hint(err, allow_pickle)}") from None
        identity["source"] = str(path.resolve())
    elif _looks_like_path(model):
        raise ModelError(f"model not found: {model} (no such file or folder)")
    else:
        try:
            folder = StableDiffusionPipeline.download(
                model, revision=revision, use_safetensors=None if allow_pickle else True
            )
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, use_safetensors=None if allow_pickle else True, **common
            )
        except Exception as err:
            raise ModelError(
                f"could not load {model!r} from the hub or its cache: {_loader_hint(err, allow_pickle)}"
            ) from None
        if Path(folder).parent.name == "snapshots":
            identity["revision"] = Path(folder).name  # the commit hash of the snapshot
    identity["fingerprint"] = weights_fingerprint(pipe.unet, pipe.text_encoder, pipe.vae)
    return StableDiffusionBackend(pipe, identity, device, dtype)


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or model.lower().endswith((".safetensors",) + PICKLE_SUFFIXES)
    )


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _loader_hint(err: Exception, allow_pickle: bool) -> str:
    text = str(err)
    if "safetensors" in text.lower() and not allow_pickle:
        return ("it has no .safetensors weights; pass --allow-pickle to load its pickled "
                "weights if you trust its source")
    if "offline" in text.lower() or "connect" in text.lower() or "cache" in text.lower():
        return ("not in the local cache and the hub is not reachable; connect to the network once, "
                "or pass a local diffusers folder or .safetensors file")
    return _short(err)
