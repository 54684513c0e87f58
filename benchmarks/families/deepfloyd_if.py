"""DeepFloyd IF-I-XL + IF-II-L with random weights, for GPU timing runs: speed does not depend
on weight values, so nothing is downloaded.

The configs below are those of DeepFloyd/IF-I-XL-v1.0 (the 4.3B-parameter IF-I that diffusers'
IF documentation uses) and DeepFloyd/IF-II-L-v1.0 (their unet/ config.json), of T5-v1.1-XXL's
encoder (google/t5-v1_1-xxl, IF's text encoder), and the schedulers diffusers' IF conversion
writes (scripts/convert_if.py), with the values that shape the networks. `PARAMETERS` are the
counts those configs give, which tests/test_deepfloyd_if.py checks on the "meta" device (no
memory). Built for real, the model holds about 10 billion float32 weights (about 40 GB), so
build it on the GPU:

    backend = random_if("cuda")
"""

from __future__ import annotations

import torch

# IF-I-XL: 64 px, [ε, variance] out, T5's 4096 projected to 2816, attention-pooled text in the
# time embedding
IF_I_UNET = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
    block_out_channels=(704, 1408, 2112, 2816), cross_attention_dim=2816, attention_head_dim=64,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=32, act_fn="gelu",
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=64, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
)
# IF-II-L: 256 px, x_t beside the upscaled 64 px image (6 channels in), its noise level as
# class label
IF_II_UNET = dict(
    sample_size=256, in_channels=6, out_channels=6, layers_per_block=(2, 2, 3, 5, 5),
    block_out_channels=(160, 320, 640, 960, 1280), cross_attention_dim=1280,
    attention_head_dim=64,
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                      "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", norm_num_groups=32, act_fn="gelu",
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=64, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
    mid_block_scale_factor=1.4142271248762552, resnet_out_scale_factor=1.4142271248762552,
    resnet_skip_time_act=True,
)
# T5-v1.1-XXL's encoder
TEXT_ENCODER = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)
LEARNED = dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
               prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95)
IF_I_SCHEDULER = dict(LEARNED, sample_max_value=1.5)
IF_II_SCHEDULER = dict(LEARNED, sample_max_value=1.0)
IMAGE_NOISING_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2")
# IF-I-XL 4.3B and IF-II-L 1.2B, as their model cards say; T5-v1.1-XXL's encoder 4.8B
PARAMETERS = {"unet": 4_304_695_110, "text_encoder": 4_762_310_656, "sr256": 1_187_608_070}
WORDS = ["a", "photo", "of", "the", "dog", "cat", "sitting", "standing", "red", "blue",
         "painting", "with", "hat"]

# a CPU stand-in of the same structure: IF-I at 8 px, IF-II to 32 px, a 2-layer T5 of width 8
_TINY_UNET = dict(
    block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=4, encoder_hid_dim=8, addition_embed_type_num_heads=2)
TINY = dict(
    unet=IF_I_UNET | _TINY_UNET | dict(sample_size=8),
    sr256=IF_II_UNET | _TINY_UNET | dict(sample_size=32),
    text_encoder=TEXT_ENCODER | dict(vocab_size=1000, d_model=8, d_kv=4, d_ff=16, num_layers=2,
                                     num_heads=2, relative_attention_num_buckets=8),
)
REAL = dict(unet=IF_I_UNET, sr256=IF_II_UNET, text_encoder=TEXT_ENCODER)


def random_if_pipelines(device: str | torch.device = "cpu", seed: int = 0, shape: str = "real"):
    """(IFPipeline, IFSuperResolutionPipeline) of IF-I-XL's and IF-II-L's architectures with
    random weights, each made on `device` ("meta": shapes only; `shape` "tiny": a CPU
    stand-in)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from imagic.tokenizer import word_level_t5_tokenizer

    spec = TINY if shape == "tiny" else REAL
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        sr_unet = UNet2DConditionModel(**spec["sr256"])
        text_encoder = T5EncoderModel(T5Config(**spec["text_encoder"]))
    unused = dict(safety_checker=None, feature_extractor=None, watermarker=None,
                  requires_safety_checker=False)
    if_i = IFPipeline(tokenizer=word_level_t5_tokenizer(WORDS), text_encoder=text_encoder,
                      unet=unet,
                      scheduler=DDPMScheduler(**IF_I_SCHEDULER), **unused)
    if_ii = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=sr_unet,
        scheduler=DDPMScheduler(**IF_II_SCHEDULER),
        image_noising_scheduler=DDPMScheduler(**IMAGE_NOISING_SCHEDULER), **unused)
    return if_i, if_ii


def random_if(device: str | torch.device = "cuda", shape: str = "real"):
    """A DeepFloydIFBackend over `random_if_pipelines` on `device` (bf16 frozen parts on CUDA,
    as the CLI's default)."""
    from imagic.backends.deepfloyd_if import DeepFloydIFBackend

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    identity = {"source": f"random-weights-if-i-xl+if-ii-l-{shape}", "fingerprint": "random"}
    if_i, if_ii = random_if_pipelines(device, shape=shape)
    return DeepFloydIFBackend(if_i, if_ii, identity, device, dtype)
