"""Pixel-space diffusion (the Imagen family the paper's main results used): the UNet works on the
image itself, so x0 is the image in [−1, 1] and sampling needs no decoder.

The embedded ShapesWorld model is a one-stage cascade at 32×32. Cascades with super-resolution
stages (DeepFloyd IF) list them in `auxiliary_stages`; the engine then fine-tunes each of them on
the input at its resolution, conditioned on e_tgt, as the paper does (§3.1).

A model folder holds `imagic_model.json` and diffusers/transformers component folders:
`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..errors import ModelError
from ..images import to_pil, to_tensor
from .diffusers_unet import UNetBackend, weights_fingerprint

MODEL_FILE = "imagic_model.json"
EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "shapes-32"
EMBEDDED_SOURCE = "imagic:shapes-32"  # how sessions name the embedded model (no path: it moves)


class PixelCascadeBackend(UNetBackend):
    """A pixel-space text-to-image UNet with a CLIP text encoder (one stage for now)."""

    family = "pixel-cascade"
    default_preset = "shapes"  # presets.py: tuned for the embedded ShapesWorld model

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config, identity, device, dtype,
                 coord_channels: int = 0):
        super().__init__(unet, text_encoder, tokenizer, scheduler_config, identity, device, dtype)
        self.resolution = self.unet.config.sample_size
        self.coord_channels = coord_channels

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        return add_coordinates(x) if self.coord_channels else x

    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        """x0 = the pixels in [−1, 1]."""
        return to_tensor(image).to(self.device)

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        return to_pil(x)


def add_coordinates(x: torch.Tensor) -> torch.Tensor:
    """x with two more channels, the column and row of each pixel in [−1, 1] (CoordConv).

    Convolutions are blind to where they are; captions name places ("at the top left"). With the
    coordinates as input, cross-attention can tie a position word to a place directly, which a
    small UNet otherwise learns slowly, if at all, from the zero padding at the borders.
    """
    n, _, h, w = x.shape
    rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    cols = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    return torch.cat([x, cols.expand(n, 1, h, w), rows.expand(n, 1, h, w)], dim=1)


def is_pixel_model(path: Path) -> bool:
    return (path / MODEL_FILE).is_file()


def load_pixel_model(path: str | Path, device: torch.device, dtype: torch.dtype,
                     source: str | None = None) -> PixelCascadeBackend:
    """Load a model folder written by `imagic train-shapes` (or the embedded one)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    try:
        meta = json.loads((path / MODEL_FILE).read_text())
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{path} is not a complete imagic model folder: {err}") from None
    identity = {
        "source": source or str(path.resolve()),
        "name": meta.get("name"),
        "revision": meta.get("revision"),
        "fingerprint": weights_fingerprint(unet, text_encoder),
    }
    return PixelCascadeBackend(unet, text_encoder, tokenizer, scheduler_config, identity,
                               device, dtype, coord_channels=meta.get("coord_channels", 0))
