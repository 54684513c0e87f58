"""SDXL (the base 1.0 architecture) through diffusers: two CLIP text encoders, a pooled embedding
and the size/crop time ids.

e is what the UNet reads of a text, as diffusers' `StableDiffusionXLPipeline.encode_prompt` makes
it: `hidden_states`, the penultimate hidden states of both encoders side by side (77×2048 for
SDXL base), and `pooled`, text_encoder_2's projected pooled output (1280). Stage 1 optimizes
both, and η interpolates both (`TextCond.lerp`). The time ids say "a square image of the model's
resolution, uncropped", as the pipeline makes them at its default size. Latents, loss and
sampling are Stable Diffusion's (stable_diffusion.py, diffusers_unet.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ModelError
from .base import TextCond
from .diffusers_unet import _count, weights_fingerprint
from .stable_diffusion import StableDiffusionBackend, load_pipeline

PIPELINE = "StableDiffusionXLPipeline"  # model_index.json's _class_name of an SDXL base folder
# The parts an SDXL base model is made of (model_index.json's keys and the folders beside it)
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# A tensor only SDXL base-architecture checkpoints have: diffusers' own test for single files
# (loaders/single_file_utils.CHECKPOINT_KEY_NAMES["xl_base"])
SINGLE_FILE_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"


class SDXLBackend(StableDiffusionBackend):
    """Stable Diffusion XL: SD's latent diffusion, with a second text encoder whose pooled output
    and the image's size and crop enter the UNet beside the cross-attention."""

    family = "sdxl"
    default_preset = "sdxl"  # presets.py

    def __init__(self, pipe, identity: dict, device: torch.device, dtype: torch.dtype):
        check_parts(pipe, identity.get("source", "the model"))
        super().__init__(pipe, identity, device, dtype)
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
        self.text_encoder_2.to(device, self.frozen_dtype)
        self.text_encoder_2.requires_grad_(False)
        self.text_encoder_2.eval()
        if self.vae.config.get("force_upcast", False):
            # SDXL's VAE overflows in half precision: its config says so, and diffusers keeps it
            # in float32 for training and decoding
            self.vae.to(torch.float32)
        # The pipeline's unconditional e without a negative prompt: zeros (SDXL base), or the
        # encoding of "" where the model's config says otherwise
        self.force_zeros_for_empty_prompt = bool(
            pipe.config.get("force_zeros_for_empty_prompt", True))
        # (original height, width) + crop (top, left) + (target height, width), the pipeline's
        # `_get_add_time_ids` for an uncropped square image at the model's resolution
        size = (self.resolution, self.resolution)
        self.time_ids = torch.tensor([size + (0, 0) + size], dtype=torch.float32, device=device)

    def predict(self, stage: str, x_t: torch.Tensor, t, cond: TextCond,
                extra: tuple = ()) -> torch.Tensor:
        """f_θ(x_t, t, e): the UNet reads e's hidden states by cross-attention, and its pooled
        embedding with the time ids through the added time embedding."""
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids.expand(x_t.shape[0], -1)}
        return self.unet(x_t, t, encoder_hidden_states=cond.hidden_states,
                         added_cond_kwargs=added).sample

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> TextCond:
        """e as the pipeline's `encode_prompt` makes it (no clip skip). The empty text, which the
        engine asks for as classifier-free guidance's unconditional e, is zeros when the model
        says `force_zeros_for_empty_prompt`, as the pipeline's default negative prompt is."""
        texts = list(texts)
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # SDXL reads the penultimate layer
        # the pooled embedding is text_encoder_2's (the last one's) projected pooled output
        cond = TextCond(torch.cat(hidden, dim=-1).float(), output.text_embeds.float())
        if not self.force_zeros_for_empty_prompt:
            return cond
        empty = torch.tensor([text == "" for text in texts], device=self.device)
        return cond.map(lambda v: v.masked_fill(empty.view(-1, *[1] * (v.dim() - 1)), 0.0))

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        return {"unet": counts["unet"], "text_encoder": counts["text_encoder"],
                "text_encoder_2": _count(self.text_encoder_2), "vae": counts["vae"]}

    def info(self) -> dict:
        widths = (self.text_encoder.config.hidden_size, self.text_encoder_2.config.hidden_size)
        return {**super().info(),
                "text_embedding": f"{sum(widths)} ({widths[0]} + {widths[1]})",
                "pooled_embedding": self.text_encoder_2.config.projection_dim,
                "parameters": self.parameter_counts()}


def check_parts(pipe, source: str) -> None:
    """One line for an SDXL pipeline that imagic cannot run: a part missing (the refiner has no
    first text encoder), or a UNet that reads other added conditions than the base model's
    (the refiner's aesthetic score) or more input channels (inpainting)."""
    from transformers import CLIPTextModelWithProjection

    for part in PARTS:
        if getattr(pipe, part, None) is None:
            raise ModelError(f"{source} has no {part}: an SDXL base model needs both text "
                             "encoders and tokenizers, the UNet, the VAE and the scheduler")
    if not isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection):
        raise ModelError(f"{source}: text_encoder_2 must be a CLIPTextModelWithProjection (its "
                         f"projected pooled output), not a {type(pipe.text_encoder_2).__name__}")
    if pipe.tokenizer.model_max_length != pipe.tokenizer_2.model_max_length:
        raise ModelError(f"{source}: the two tokenizers read {pipe.tokenizer.model_max_length} "
                         f"and {pipe.tokenizer_2.model_max_length} tokens; SDXL needs the same")
    unet = pipe.unet.config
    expected = 6 * (unet.get("addition_time_embed_dim") or 0) + \
        pipe.text_encoder_2.config.projection_dim
    if unet.get("addition_embed_type") != "text_time" or \
            unet.get("projection_class_embeddings_input_dim") != expected:
        raise ModelError(f"{source}: its UNet does not take SDXL base's pooled embedding and six "
                         "size/crop time ids (an SDXL refiner?); imagic runs the base model")
    if unet.in_channels != unet.out_channels:
        raise ModelError(f"{source}: its UNet reads {unet.in_channels} channels (an inpainting "
                         f"model?); imagic runs the base model ({unet.out_channels})")
    if "EDM" in type(pipe.scheduler).__name__:
        raise ModelError(f"{source}: its noise schedule ({type(pipe.scheduler).__name__}) is not "
                         "a DDPM one; imagic runs SDXL base's discrete schedule")


def check_folder(path: Path) -> None:
    """One line, before diffusers reads any weights, for a folder that is not an SDXL base
    pipeline or lacks one of its parts."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        raise ModelError(f"{path} is not a diffusers model folder (no readable "
                         "model_index.json)") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name != PIPELINE:
        raise ModelError(f"{path} holds a {name or 'unnamed'} model, not an SDXL base one "
                         f"({PIPELINE})")
    for part in PARTS:
        entry = index.get(part)
        if not isinstance(entry, list) or None in entry:
            raise ModelError(f"{path} has no {part}: an SDXL base model needs both text encoders "
                             "and tokenizers, the UNet, the VAE and the scheduler")
        if not (path / part).is_dir():
            raise ModelError(f"{path} is missing its {part} folder")


def is_sdxl(model: str, config: str | None = None, revision: str | None = None) -> bool:
    """Whether `model` names an SDXL pipeline, from what diffusers itself reads first: a folder's
    (or a single file's --config folder's, or a hub model's) model_index.json, any SDXL
    pipeline class counting (load_sdxl then refuses those it cannot run); a .safetensors file's
    tensor names without --config. False when it cannot tell: the other loaders report that."""
    path = Path(model).expanduser()
    if path.is_file():
        if config is not None:
            index = Path(config).expanduser() / "model_index.json"
            return _class_name(index).startswith("StableDiffusionXL")
        if path.suffix.lower() != ".safetensors":
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as checkpoint:
                names = checkpoint.keys()  # from the header: no tensor is read
            return SINGLE_FILE_KEY in names
        except Exception:  # not a readable safetensors file: the other loaders say so
            return False
    if path.is_dir():
        return _class_name(path / "model_index.json").startswith("StableDiffusionXL")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return False  # neither a path that exists nor a hub id
    try:  # from the hub's cache offline; only the small index file is fetched online
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(model, "model_index.json", revision=revision)
    except Exception:
        return False
    return _class_name(Path(index)).startswith("StableDiffusionXL")


def _class_name(index: Path) -> str:
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


def load_sdxl(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    config: str | None = None,
    revision: str | None = None,
) -> SDXLBackend:
    """Load SDXL base from a hub id, a local diffusers folder, or one checkpoint file."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(model).expanduser()
    if path.is_dir():
        check_folder(path)
    pipe, identity = load_pipeline(StableDiffusionXLPipeline, "an SDXL", model, allow_pickle,
                                   config, revision)
    check_parts(pipe, model)
    identity["fingerprint"] = weights_fingerprint(pipe.unet, pipe.text_encoder,
                                                  pipe.text_encoder_2, pipe.vae)
    return SDXLBackend(pipe, identity, device, dtype)
