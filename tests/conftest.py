"""Tiny random-weight Stable Diffusion pipelines, built in-process with a fixed seed.

Nothing here touches the network: the tokenizer comes from a vocabulary written below.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

WORDS = [
    "a", "photo", "of", "the", "dog", "cat", "sitting", "standing", "red", "blue", "green",
    "painting", "with", "hat", "on", "grass", "in", "snow",
]
TOKENS = 16  # the tiny encoder reads 16 tokens, so "too long" texts are cheap to write


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """SD-shaped components small enough that a whole edit runs on a CPU in seconds:
    a 64 px image, a 4×16×16 latent (a 3-block VAE), a 2-block UNet with cross-attention of
    width 8."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagic.tokenizer import word_level_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, sample_size=64,
    )
    tokenizer = word_level_clip_tokenizer(WORDS, max_length=TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny ε-prediction pipeline saved as a diffusers folder (safetensors)."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_pipeline("epsilon").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd-v"
    build_tiny_pipeline("v_prediction", seed=1).save_pretrained(path, safe_serialization=True)
    return path


def make_photo(size=(80, 64), seed: int = 0) -> Image.Image:
    """A small synthetic 'photo': a smooth gradient with a bright disc, not square on purpose."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    cx, cy = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
    disc = (((xs - cx) ** 2 + (ys - cy) ** 2) < 0.04).float()
    rgb = torch.stack(
        [0.2 + 0.5 * xs + 0.3 * disc, 0.3 + 0.4 * ys, 0.6 - 0.3 * xs * ys + 0.2 * disc]
    )
    array = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@pytest.fixture
def photo_path(tmp_path):
    path = tmp_path / "photo.png"
    make_photo().save(path)
    return path


def pytest_terminal_summary(terminalreporter, config):
    """The fuzz tests' seed beside their statistics, so a CI log says how to replay them."""
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"hypothesis seed: {seed} (replay: pytest "
                                    f"--hypothesis-seed={seed} tests/test_reliability.py)")
