"""Stable Diffusion 1.x / 2.x through diffusers: latent diffusion with a CLIP text encoder.

x0 is the VAE latent mean × the VAE's scaling factor; e is the CLIP last hidden state (77×768 for
SD 1.x); the target of the loss is ε or v as the scheduler config says (SD 2.x 768 is v).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import ModelError
from ..images import to_pil, to_tensor
from .diffusers_unet import UNetBackend, weights_fingerprint

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class StableDiffusionBackend(UNetBackend):
    """Latent diffusion: the UNet works on VAE latents; the VAE is frozen (half on CUDA)."""

    family = "stable-diffusion"
    bounded_samples = False  # latents

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config,
                         identity, device, dtype)
        self.vae = pipe.vae.to(device, self.frozen_dtype)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor

    @torch.no_grad()
    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        """x0 = the VAE latent mean × the VAE's scaling factor."""
        pixels = to_tensor(image).to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        latents = x / self.vae.config.scaling_factor
        return to_pil(self.vae.decode(latents.to(self.vae.dtype)).sample)

    def parameter_counts(self) -> dict[str, int]:
        return {**super().parameter_counts(), "vae": sum(p.numel() for p in self.vae.parameters())}


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

    pipe, identity = load_pipeline(
        StableDiffusionPipeline, "a Stable Diffusion", model, allow_pickle, config, revision,
        safety_checker=None, requires_safety_checker=False)
    identity["fingerprint"] = weights_fingerprint(pipe.unet, pipe.text_encoder, pipe.vae)
    return StableDiffusionBackend(pipe, identity, device, dtype)


def load_pipeline(pipeline_class, what: str, model: str, allow_pickle: bool = False,
                  config: str | None = None, revision: str | None = None, **kwargs):
    """A diffusers pipeline of `pipeline_class` (float32) from a hub id, a local diffusers
    folder, or one checkpoint file, as diffusers loads them, and its identity for sessions
    (source, revision; for a single file its size and the configs folder). `what` names the
    family in errors ("a Stable Diffusion"); every failure is one ModelError line."""
    common = dict(dtype=torch.float32, **kwargs)
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
            pipe = pipeline_class.from_single_file(
                str(path), config=config, local_files_only=config is not None, **common
            )
        except Exception as err:  # diffusers raises many kinds here; the user needs one line
            hint = "" if config else (
                "; offline it needs --config DIR (a diffusers folder of the same model)"
            )
            raise ModelError(
                f"could not load {path.name} as {what} checkpoint{hint} ({_short(err)})"
            ) from None
        # where to load it again (`imagic generate` without --model): absolute paths, and the
        # configs folder that an offline single-file load needs
        identity["source"] = str(path.resolve())
        identity["config"] = str(Path(config).expanduser().resolve()) if config else None
        identity["file_size"] = path.stat().st_size
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
        try:
            pipe = pipeline_class.from_pretrained(
                str(path), use_safetensors=None if allow_pickle else True, **common
            )
        except Exception as err:
            raise ModelError(f"could not load {path}: {_loader_hint(err, allow_pickle)}") from None
        identity["source"] = str(path.resolve())
    elif _looks_like_path(model):
        raise ModelError(f"model not found: {model} (no such file or folder)")
    else:
        try:
            folder = pipeline_class.download(
                model, revision=revision, use_safetensors=None if allow_pickle else True
            )
            pipe = pipeline_class.from_pretrained(
                folder, use_safetensors=None if allow_pickle else True, **common
            )
        except Exception as err:
            raise ModelError(
                f"could not load {model!r} from the hub or its cache: "
                f"{_loader_hint(err, allow_pickle)}"
            ) from None
        if Path(folder).parent.name == "snapshots":
            identity["revision"] = Path(folder).name  # the commit hash of the snapshot
    return pipe, identity


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
