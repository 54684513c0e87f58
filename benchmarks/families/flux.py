"""FLUX.1-dev with random weights, from its published configs written below
(black-forest-labs/FLUX.1-dev: transformer, vae, text_encoder (CLIP-L), text_encoder_2 (T5-XXL
v1.1 encoder), scheduler). schnell is the same architecture without the guidance embedding
(`guidance_embeds=False`).

    from benchmarks.families.flux import random_flux
    backend = random_flux(torch.device("cuda"))          # about 17B parameters; build on a GPU
    backend = random_flux(torch.device("cpu"), "tiny")   # the same code path, in seconds

At full size the transformer alone is 48 GB in fp32 (θ trains in fp32, UNetBackend's rule) and
T5-XXL 9.5 GB in bf16: build it on a card with at least 80 GB.
"""

from __future__ import annotations

import torch

from .sd3 import SHAPES as SD3_SHAPES
from .sd3 import text_encoders

SHAPES = {
    "real": {
        "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "vae": SD3_SHAPES["real"]["vae"] | dict(scaling_factor=0.3611, shift_factor=0.1159),
        "clip_l": SD3_SHAPES["real"]["clip_l"], "t5": SD3_SHAPES["real"]["t5"],
        "tokens": (77, 512),
    },
    "tiny": {
        "transformer": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                            pooled_projection_dim=16, guidance_embeds=True,
                            axes_dims_rope=(2, 2, 4)),
        "vae": SD3_SHAPES["tiny"]["vae"],
        "clip_l": SD3_SHAPES["tiny"]["clip_l"], "t5": SD3_SHAPES["tiny"]["t5"],
        "tokens": (77, 32),
    },
}


def random_flux(device: torch.device, shape: str = "real", schnell: bool = False):
    """A FluxBackend over random weights of FLUX.1-dev (schnell: without the guidance
    embedding; `shape` "tiny": a CPU stand-in)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    from imagic.backends.flux import FluxBackend

    spec = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    encoders = text_encoders(spec, device, dtype, projection=False)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**spec["transformer"] | dict(
            guidance_embeds=not schnell))  # fp32: θ trains in fp32
        vae = AutoencoderKL(**spec["vae"]).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=encoders["clip_l"], tokenizer=encoders["clip_tokenizer"],
                        text_encoder_2=encoders["t5"], tokenizer_2=encoders["t5_tokenizer"])
    name = "schnell" if schnell else "dev"
    identity = {"source": f"random-weights-flux.1-{name}-{shape}", "fingerprint": "random"}
    return FluxBackend(pipe, identity, device, dtype)
