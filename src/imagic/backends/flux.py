"""FLUX.1 (dev and schnell) through diffusers.

e has two parts, as `FluxPipeline.encode_prompt` makes them: T5-XXL's hidden states (B×512×4096
for dev, 256 tokens for schnell) and CLIP-L's pooled output (B×768). x0 is the 16-channel VAE
latent, shifted and scaled, kept unpacked; the transformer reads it packed in 2×2 patches with
position ids, as the pipeline does. FLUX.1-dev is guidance-distilled: the guidance scale enters
as an embedding and there is no classifier-free guidance; schnell has neither.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from .base import TextCond
from .diffusers_unet import weights_fingerprint
from .flow import FlowBackend, load_flow_pipeline

# train_dreambooth_lora_flux.py's default --guidance_scale, FluxPipeline's default guidance_scale:
# the embedding value of stages 1 and 2 (and of the inversion)
TRAIN_GUIDANCE = 3.5
# train_dreambooth_lora_flux.py's default LoRA targets (--lora_layers unset)
FLUX_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
    "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)


class FluxBackend(FlowBackend):
    """FLUX's transformer on packed VAE latents, with CLIP-L (pooled) and T5-XXL."""

    family = "flux"
    # train_dreambooth_lora_flux.py: --weighting_scheme none (σ index uniform, loss unweighted)
    weighting_scheme = "none"
    lora_targets = FLUX_LORA_TARGETS
    classifier_free_guidance = False

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype):
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        # FluxPipeline reads 512 T5 tokens at most; schnell's model card samples with 256
        t5_tokens = min(512 if self.guidance_embeds else 256, pipe.tokenizer_2.model_max_length)
        super().__init__(pipe, identity, device, dtype, "text_encoder_2", t5_tokens)
        # The VAE config's sample size (1024 for FLUX.1): FluxPipeline's default image side,
        # its default_sample_size 128 × the VAE's factor 8, in a form a small model can set.
        self.resolution = int(self.vae.config.sample_size)
        if self.resolution % (2 * self.vae_scale_factor):
            raise ModelError(f"{identity.get('source')}: the VAE's sample_size {self.resolution} "
                             f"is not a multiple of {2 * self.vae_scale_factor}, which FLUX's "
                             "2×2 latent packing needs")
        self._ids: dict[tuple, torch.Tensor] = {}  # position ids per latent size, made once

    @property
    def default_preset(self) -> str:  # presets.py: dev's recipe, or schnell's few steps
        return "flux" if self.guidance_embeds else "flux-schnell"

    def encode_prompts(self, texts: list[str]) -> TextCond:
        hidden, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=self.device,
            max_sequence_length=self.text_sequence_length)
        return TextCond(hidden, pooled)

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        # as FluxPipeline: σ evenly from 1 to 1/steps, shifted by μ of the image's token count
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.sampler_config)
        _, height, width = self.latent_shape()
        config = scheduler.config
        mu = calculate_shift((height // 2) * (width // 2),
                             config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas

    def predict(self, stage, x_t, t, cond, extra=(), guidance=None):
        """v_θ on x_t packed as FluxPipeline packs latents, unpacked again. FLUX-dev's guidance
        embedding takes `guidance` (stage 3) or TRAIN_GUIDANCE (stages 1–2, the inversion)."""
        from diffusers import FluxPipeline

        batch, channels, height, width = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
        image_ids, text_ids = self._position_ids(height, width, cond.hidden_states.shape[1])
        embedding = None
        if self.guidance_embeds:
            value = TRAIN_GUIDANCE if guidance is None else guidance
            embedding = torch.full((batch,), value, device=x_t.device, dtype=torch.float32)
        out = self.unet(hidden_states=packed, timestep=t / 1000, guidance=embedding,
                        pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden_states,
                        txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height * self.vae_scale_factor,
                                            width * self.vae_scale_factor, self.vae_scale_factor)

    def _position_ids(self, height: int, width: int, tokens: int):
        """FluxPipeline's image ids (row, column of each 2×2 patch) and zero text ids, made once
        per size: made inside a recorded CUDA graph, their host-to-device copy would break it."""
        from diffusers import FluxPipeline

        key = (height, width, tokens)
        if key not in self._ids:
            image = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2,
                                                           self.device, torch.float32)
            text = torch.zeros(tokens, 3, device=self.device)
            self._ids[key] = (image, text)
        return self._ids[key]


def load_flux(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    config: str | None = None,
    revision: str | None = None,
) -> FluxBackend:
    """Load FLUX.1 from a hub id, a local diffusers folder, or one .safetensors file."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    required = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pipe, identity = load_flow_pipeline(FluxPipeline, FluxTransformer2DModel, "a FLUX.1",
                                        required, model, allow_pickle, config, revision)
    identity["fingerprint"] = weights_fingerprint(pipe.transformer, pipe.vae, pipe.text_encoder,
                                                  pipe.text_encoder_2)
    return FluxBackend(pipe, identity, device, dtype)
