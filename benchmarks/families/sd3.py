"""Stable Diffusion 3.5 medium with random weights, from its published configs written below
(stabilityai/stable-diffusion-3.5-medium: transformer, vae, text_encoder (CLIP-L),
text_encoder_2 (CLIP-G), text_encoder_3 (T5-XXL v1.1 encoder), scheduler).

    from benchmarks.families.sd3 import random_sd3
    backend = random_sd3(torch.device("cuda"))          # about 8B parameters; build on a GPU
    backend = random_sd3(torch.device("cpu"), "tiny")   # the same code path, in seconds

The modules are built on `device` directly (no full-size copy in host memory), text encoders
cast to bf16 on CUDA right after they are made.
"""

from __future__ import annotations

import torch

WORDS = ["a", "photo", "of", "the", "dog", "cat", "sitting", "standing", "red", "blue", "with",
         "hat", "on", "grass"]

VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
              hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, max_position_embeddings=77,
              hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128)

SHAPES = {
    "real": {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                            num_layers=24, attention_head_dim=64, num_attention_heads=24,
                            joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, pos_embed_max_size=384,
                            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "vae": VAE | dict(scaling_factor=1.5305, shift_factor=0.0609),
        "clip_l": CLIP_L, "clip_g": CLIP_G, "t5": T5_XXL, "tokens": (77, 256),
    },
    "tiny": {
        "transformer": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4,
                            num_layers=2, attention_head_dim=8, num_attention_heads=2,
                            joint_attention_dim=32, caption_projection_dim=16,
                            pooled_projection_dim=32, pos_embed_max_size=32,
                            dual_attention_layers=(0,), qk_norm="rms_norm"),
        "vae": dict(VAE, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                    norm_num_groups=4, sample_size=64,
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5,
                    shift_factor=0.1),
        "clip_l": dict(CLIP_L, vocab_size=1000, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, projection_dim=16),
        "clip_g": dict(CLIP_G, vocab_size=1000, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, projection_dim=16),
        "t5": dict(T5_XXL, vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_heads=4),
        "tokens": (77, 32),
    },
}


def text_encoders(spec: dict, device: torch.device, dtype: torch.dtype, projection: bool = True):
    """CLIP-L (with its projection for SD3, plain for FLUX), CLIP-G when `spec` has it, and the
    T5 encoder, built on `device` and cast to `dtype`, with their tokenizers."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from imagic.tokenizer import word_level_clip_tokenizer, word_level_t5_tokenizer

    clip_tokens, t5_tokens = spec["tokens"]
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    made = {}
    with torch.device(device):
        clip_class = CLIPTextModelWithProjection if projection else CLIPTextModel
        made["clip_l"] = clip_class(CLIPTextConfig(**spec["clip_l"], **ids)).to(dtype)
        if "clip_g" in spec:
            made["clip_g"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**spec["clip_g"], **ids)).to(dtype)
        made["t5"] = T5EncoderModel(T5Config(**spec["t5"], pad_token_id=0, eos_token_id=1,
                                             decoder_start_token_id=0)).to(dtype)
    made["clip_tokenizer"] = word_level_clip_tokenizer(WORDS, max_length=clip_tokens)
    made["t5_tokenizer"] = word_level_t5_tokenizer(WORDS, max_length=t5_tokens)
    return made


def random_sd3(device: torch.device, shape: str = "real"):
    """An SD3Backend over random weights of SD3.5 medium (`shape` "tiny": a CPU stand-in)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from imagic.backends.sd3 import SD3Backend

    spec = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    encoders = text_encoders(spec, device, dtype)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**spec["transformer"])  # fp32: θ trains in fp32
        vae = AutoencoderKL(**spec["vae"]).to(dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders["clip_l"], tokenizer=encoders["clip_tokenizer"],
        text_encoder_2=encoders["clip_g"], tokenizer_2=encoders["clip_tokenizer"],
        text_encoder_3=encoders["t5"], tokenizer_3=encoders["t5_tokenizer"])
    identity = {"source": f"random-weights-sd3.5-medium-{shape}", "fingerprint": "random"}
    return SD3Backend(pipe, identity, device, dtype)
