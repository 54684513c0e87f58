"""The ShapesWorld 2 cascade: a 32×32 base text-to-image UNet, a 32→128 super-resolution UNet
and a small CLIP text encoder that both read.

The base is 32×32 because an Imagic edit trains it on a CPU (stages 1 and 2 run a few hundred
forward and backward passes), and its cost grows with its pixels; at 32×32 every object's kind,
pose, colour, size and place still shows. The details that captions never name (markings, exact
proportions) and the background's pebbles live at 128×128, in the super-resolution stage, which
is the stage the paper fine-tunes on the input to carry them into the edit (§3.1).

The super-resolution UNet follows Imagen's design (Saharia et al. 2022): it reads x_t beside
the 32×32 image upsampled to 128×128, and the augmentation level of that image as its class
label; it has text cross-attention at 16×16 only and no self-attention, so, like Imagen's
super-resolution models, it can train on crops of the image and sample the whole of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError
from ..tokenizer import word_level_clip_tokenizer
from .world import IMAGE_SIZE, POSITIONS, VOCABULARY, Thing, caption

BASE_SIZE = 32
SR_STAGE = "sr128"  # the super-resolution stage's name (its folder in an exported model)
CROP_GRID = 8  # training crops of the super-resolution stage start on this grid: its UNet's
# stride, so a crop sees the pixel grid the whole image does


@dataclass
class CascadeConfig:
    # --- base UNet (diffusers UNet2DConditionModel, 32×32 pixels) ---
    base_channels: tuple[int, ...] = (32, 64, 96)  # widths at 32², 16², 8²
    base_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    base_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    # --- super-resolution UNet (128×128 pixels) ---
    sr_channels: tuple[int, ...] = (32, 48, 64, 96)  # widths at 128², 64², 32², 16²
    sr_down: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D",
                                "CrossAttnDownBlock2D")
    sr_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")
    sr_max_noise_level: int = 250  # training draws the augmentation timestep from 0 to this
    sr_noise_level: int = 25  # the augmentation timestep when sampling (chosen on held-out
    # captions by benchmarks/shapes2_sr_level.py)
    sr_sample_steps: int = 25  # its DDIM steps (a stage with a sharp conditioning image needs
    # far fewer than the base)
    sr_guidance: float = 1.0  # its guidance: 1 runs no unconditional pass
    # its samples keep the base's image at 32 px (backends/cascade.py): it only adds detail,
    # so it cannot move the colours an edit keeps
    sr_consistent: bool = True
    sr_crop: int = 32  # training's side of its random crops (Imagen: a quarter of the side);
    # a multiple of CROP_GRID
    # --- shared ---
    layers_per_block: int = 1  # ResNet blocks per resolution (the up path has one more)
    attention_head_dim: int = 8  # diffusers passes this as the number of heads
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width
    coord_channels: int = 2  # the base's pixel coordinates (backends.cascade.add_coordinates)
    # --- text encoder (transformers CLIPTextModel) ---
    text_hidden_size: int = 64  # also the UNets' cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32  # BOS + longest caption (26 words) + EOS, with room to spare
    # --- noise schedule ---
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        """One line for a base the UNet cannot be built with (`--base-channels`)."""
        widths = self.base_channels
        if len(widths) != len(self.base_down) or len(widths) != len(self.base_up):
            raise InputError(f"the base has {len(self.base_down)} resolutions: give "
                             f"{len(self.base_down)} widths, got {len(widths)}")
        attends = ["CrossAttn" in block for block in self.base_down]
        if any(w <= 0 or w % self.norm_num_groups or (attention and w % self.attention_head_dim)
               for w, attention in zip(widths, attends)):
            raise InputError(f"each base width must be a positive multiple of its "
                             f"{self.norm_num_groups} norm groups (and, with attention, of its "
                             f"{self.attention_head_dim} heads), got {','.join(map(str, widths))}")

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), so it compares equal to itself after a JSON round trip."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def stage_meta(self) -> dict:
        """The super-resolution stage as `imagic_model.json` describes it (backends/cascade.py)."""
        return {SR_STAGE: {"resolution": IMAGE_SIZE, "noise_level": self.sr_noise_level,
                           "max_noise_level": self.sr_max_noise_level,
                           "sample_steps": self.sr_sample_steps, "guidance": self.sr_guidance,
                           "consistent": self.sr_consistent}}


def build_tokenizer(max_tokens: int = 32):
    """One token per word of the ShapesWorld 2 grammar."""
    return word_level_clip_tokenizer(VOCABULARY, max_length=max_tokens)


def longest_caption_tokens(tokenizer) -> int:
    """Tokens (with BOS and EOS) of the longest caption the world can produce."""
    things = [Thing(kind="cat", pose="standing", colour="purple", size="large", position=p)
              for p in POSITIONS]
    return len(tokenizer(caption(things, prefix="a picture of ")).input_ids)


def build_models(config: CascadeConfig | None = None):
    """Fresh, randomly initialised ``(unet, sr_unet, text_encoder, tokenizer, scheduler)``; the
    caller seeds torch first for the same weights twice."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or CascadeConfig()
    tokenizer = build_tokenizer(config.max_tokens)
    if longest_caption_tokens(tokenizer) > config.max_tokens:
        raise ValueError(f"max_tokens={config.max_tokens} is shorter than the longest caption")
    if config.sr_crop % CROP_GRID or not 0 < config.sr_crop <= IMAGE_SIZE:
        raise ValueError(f"sr_crop={config.sr_crop} must be a multiple of {CROP_GRID} "
                         f"up to {IMAGE_SIZE}")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size,
        intermediate_size=4 * config.text_hidden_size, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, max_position_embeddings=config.max_tokens,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    shared = dict(
        out_channels=3, layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden_size, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        # the pooled caption also joins the time embedding, so every block sees the text
        addition_embed_type="text", addition_embed_type_num_heads=config.text_heads,
    )
    unet = UNet2DConditionModel(
        sample_size=BASE_SIZE, in_channels=3 + config.coord_channels,
        block_out_channels=tuple(config.base_channels), down_block_types=tuple(config.base_down),
        up_block_types=tuple(config.base_up), **shared)
    sr_unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=6,
        block_out_channels=tuple(config.sr_channels), down_block_types=tuple(config.sr_down),
        up_block_types=tuple(config.sr_up),
        only_cross_attention=True,  # text cross-attention, no self-attention: local, croppable
        class_embed_type="timestep",  # the augmentation level, embedded like t
        **shared)
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type, clip_sample=False,
    )
    return unet, sr_unet, text_encoder, tokenizer, scheduler


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())



if __name__ == "__main__":  # python -m imagic.shapes2.model: print the sizes
    models = dict(zip(("base", SR_STAGE, "text_encoder"), build_models()[:3]))
    counts = {name: parameter_count(m) for name, m in models.items()}
    print(", ".join(f"{name} {n:,}" for name, n in counts.items()),
          f"| fp32 {sum(counts.values()) * 4 / 1e6:.1f} MB")
