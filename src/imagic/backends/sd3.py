"""Stable Diffusion 3.x (SD3 medium, SD3.5 medium and large) through diffusers.

e has two parts, as `StableDiffusion3Pipeline.encode_prompt` makes them: the hidden states
(CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5-XXL's
states: B×(77 + 256)×4096) and the pooled embedding (CLIP-L and CLIP-G projections, B×2048).
Imagic optimizes and interpolates both. x0 is the 16-channel VAE latent, shifted and scaled; the
loss is flow matching with the velocity target; stage 3 is classifier-free guided.
"""

from __future__ import annotations

import torch

from .diffusers_unet import weights_fingerprint
from .flow import FlowBackend, load_flow_pipeline, require_components

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


class SD3Backend(FlowBackend):
    """SD3's MMDiT on VAE latents, with three text encoders (T5 optional, as in diffusers)."""

    family = "sd3"
    default_preset = "sd3"  # presets.py
    # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal, --logit_mean 0, --logit_std 1
    weighting_scheme = "logit_normal"
    classifier_free_guidance = True

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype):
        t5_tokens = T5_TOKENS
        if pipe.tokenizer_3 is not None:  # a tokenizer that reads fewer (the tests' tiny one)
            t5_tokens = min(T5_TOKENS, pipe.tokenizer_3.model_max_length)
        super().__init__(pipe, identity, device, dtype, "text_encoder_3", t5_tokens)
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor

    def encode_prompts(self, texts: list[str]):
        from .base import TextCond

        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.text_sequence_length)
        return TextCond(hidden, pooled)

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.sampler_config)
        scheduler.set_timesteps(steps)  # as the pipeline: evenly spaced, then the model's shift
        return scheduler.sigmas

    def predict(self, stage, x_t, t, cond, extra=(), guidance=None):
        return self.unet(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.hidden_states,
                         pooled_projections=cond.pooled, return_dict=False)[0]


def load_sd3(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    config: str | None = None,
    revision: str | None = None,
) -> SD3Backend:
    """Load SD3.x from a hub id, a local diffusers folder, or one .safetensors file."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    what = "a Stable Diffusion 3"
    # T5 (text_encoder_3) is optional, as in diffusers
    required = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    pipe, identity = load_flow_pipeline(StableDiffusion3Pipeline, SD3Transformer2DModel, what,
                                        required, model, allow_pickle, config, revision)
    if pipe.text_encoder_3 is not None and pipe.tokenizer_3 is None:
        require_components(pipe, ("tokenizer_3",), what, identity["source"])
    modules = [pipe.transformer, pipe.vae, *(m for m in (pipe.text_encoder, pipe.text_encoder_2,
                                                          pipe.text_encoder_3) if m is not None)]
    identity["fingerprint"] = weights_fingerprint(*modules)
    return SD3Backend(pipe, identity, device, dtype)
