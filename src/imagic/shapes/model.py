"""The ShapesWorld text-to-image model: a small pixel-space UNet and a small CLIP text encoder.

Both are trained from scratch (see :mod:`imagic.shapes.train`); nothing is downloaded.  The
UNet must stay small because Imagic edits run a few hundred UNet forward+backward passes on a
CPU: at 32x32 its cost is dominated by the 32x32 and 16x16 resolutions, so the widest channels
and the attention sit at 8x8 only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..tokenizer import word_level_clip_tokenizer
from .world import TEMPLATES, VOCABULARY

IMAGE_SIZE = 32


@dataclass
class ModelConfig:
    # --- UNet (diffusers UNet2DConditionModel, pixel space) ---
    block_out_channels: tuple[int, ...] = (32, 64, 96)  # widths at 32x32, 16x16, 8x8
    layers_per_block: int = 1  # ResNet blocks per resolution (the up path has one more)
    # Attention only at 8x8 (down, mid, up): adding it at 16x16 (self-attention over 256
    # positions) made a CPU training step ~1.6x slower per sample (81 vs 49 ms, one thread).
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    attention_head_dim: int = 8  # diffusers passes this as the number of heads
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width
    # Attention-pool the text into the time embedding as well, so every ResNet block (at 32x32
    # and 16x16 too) sees the caption; costs ~20k parameters and no measurable time.
    text_time_embedding: bool = True
    # --- text encoder (transformers CLIPTextModel) ---
    coord_channels: int = 2  # pixel coordinates as extra input (backends.cascade.add_coordinates)
    text_hidden_size: int = 64  # also the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16  # BOS + longest caption (11 words) + EOS, with room to spare
    # --- noise schedule ---
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: keeps small images from going to noise early
    prediction_type: str = "epsilon"

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), so it compares equal to itself after a JSON round trip."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_tokenizer(max_tokens: int = 16):
    """One token per word of the ShapesWorld grammar (no BPE files to ship)."""
    return word_level_clip_tokenizer(VOCABULARY, max_length=max_tokens)


def longest_caption_tokens(tokenizer) -> int:
    """Tokens (with BOS and EOS) of the longest caption any template can produce."""
    longest = {"shape": "triangle", "colour": "purple", "size": "large", "position": "bottom right"}
    return max(len(tokenizer(t.format(**longest)).input_ids) for t in TEMPLATES)


def build_model(config: ModelConfig | None = None):
    """Fresh, randomly initialised ``(unet, text_encoder, tokenizer, scheduler)``.

    The caller seeds torch first if it wants the same initial weights twice.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or ModelConfig()
    tokenizer = build_tokenizer(config.max_tokens)
    if longest_caption_tokens(tokenizer) > config.max_tokens:
        raise ValueError(f"max_tokens={config.max_tokens} is shorter than the longest caption")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=4 * config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3 + config.coord_channels,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        addition_embed_type="text" if config.text_time_embedding else None,
        addition_embed_type_num_heads=config.text_heads,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )
    return unet, text_encoder, tokenizer, scheduler


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":  # python -m imagic.shapes.model: print the sizes
    unet, text_encoder, tokenizer, _ = build_model()
    n_unet, n_text = parameter_count(unet), parameter_count(text_encoder)
    print(f"unet {n_unet / 1e6:.3f}M, text encoder {n_text / 1e6:.3f}M, "
          f"fp32 {(n_unet + n_text) * 4 / 1e6:.1f} MB, vocabulary {len(tokenizer)}, "
          f"longest caption {longest_caption_tokens(tokenizer)} tokens")
