"""SDXL base 1.0 with random weights, for GPU timing runs: speed does not depend on weight
values, so nothing is downloaded.

The configs below are the published ones of stabilityai/stable-diffusion-xl-base-1.0 (its
unet/, vae/, text_encoder/, text_encoder_2/ and scheduler/ config.json), written out with the
values that shape the networks. `PARAMETERS` are the parameter counts those configs give,
which tests/test_sdxl.py checks on the "meta" device (no memory). Built for real, the model
holds about 3.5 billion float32 weights (about 14 GB), so build it on the GPU:

    backend = random_sdxl("cuda")
"""

from __future__ import annotations

import torch

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
    force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
# CLIP ViT-L/14's text model, and OpenCLIP ViT-bigG/14's with its projection
TEXT_ENCODER = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
)
TEXT_ENCODER_2 = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
)
# the word-level tokenizer's special tokens (imagic.tokenizer), so CLIP pools at the end token
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
    set_alpha_to_one=False, interpolation_type="linear", use_karras_sigmas=False,
)
PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840, "vae": 83_653_863}
WORDS = ["a", "photo", "of", "the", "dog", "cat", "sitting", "standing", "red", "blue", "hat"]
# a CPU stand-in with the same structure (two CLIP encoders, pooled and time ids), 64 px
TINY = dict(
    unet=UNET | dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                     attention_head_dim=4, transformer_layers_per_block=1, norm_num_groups=4,
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 8),
    vae=VAE | dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=64,
                   norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2),
    text_encoder=TEXT_ENCODER | dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, projection_dim=8, vocab_size=1000),
    text_encoder_2=TEXT_ENCODER_2 | dict(hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         projection_dim=8, vocab_size=1000),
)
REAL = dict(unet=UNET, vae=VAE, text_encoder=TEXT_ENCODER, text_encoder_2=TEXT_ENCODER_2)


def random_sdxl_pipeline(device: str | torch.device = "cpu", seed: int = 0,
                         shape: str = "real"):
    """A StableDiffusionXLPipeline of SDXL base 1.0's architecture with random weights, each
    made on `device` ("meta": shapes only; `shape` "tiny": a CPU stand-in). The tokenizers know
    a few words (the real ones are not downloaded); their token ids lie in the real vocabulary's
    range."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagic.tokenizer import word_level_clip_tokenizer

    spec = TINY if shape == "tiny" else REAL
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], **TOKEN_IDS))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**spec["text_encoder_2"], **TOKEN_IDS))
    # the scheduler as the published config loads (it keeps clip_sample and set_alpha_to_one
    # for the DDIM sampler made from it)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=word_level_clip_tokenizer(WORDS, max_length=77),
        tokenizer_2=word_level_clip_tokenizer(WORDS, max_length=77), unet=unet,
        scheduler=scheduler,
    )


def random_sdxl(device: str | torch.device = "cuda", shape: str = "real"):
    """An SDXLBackend over `random_sdxl_pipeline` on `device` (bf16 frozen parts on CUDA, as
    the CLI's default)."""
    from imagic.backends.sdxl import SDXLBackend

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    identity = {"source": f"random-weights-sdxl-base-1.0-{shape}", "fingerprint": "random"}
    return SDXLBackend(random_sdxl_pipeline(device, shape=shape), identity, device, dtype)
