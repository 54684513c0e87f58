"""Stable Diffusion 3.x on tiny random components built here: a whole CLI edit, both stages
lowering a fixed-draw loss, the base weights untouched, sessions re-rendering bit for bit, η = 0
and 1 meeting the transformer as e_opt and e_tgt, the flow-matching loss itself, and bad folders
failing in one line. Nothing is downloaded: the tokenizers are built from the words below."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import WORDS, make_photo
from imagic import EditConfig, Imagic, load_backend
from imagic.cli import main
from imagic.editor import finetune, optimize_embedding
from imagic.images import to_square
from imagic.tokenizer import word_level_t5_tokenizer

TOKENS = 16  # every tiny text encoder reads 16 tokens
TEXT = "a photo of a sitting dog"
QUICK = EditConfig(embed_steps=15, embed_lr=5e-2, finetune_steps=15, finetune_lr=2e-3,
                   lora_lr=5e-2, timesteps_per_step=2, sample_steps=3, seeds=(0,),
                   etas=(0.0, 1.0), guidance=3.0)
CLI_FAST = ["--embed-steps", "3", "--finetune-steps", "3", "--sample-steps", "2",
            "--timesteps-per-step", "1", "--quiet"]


def tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32,
                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def tiny_clip(with_projection: bool, width: int = 8):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagic.tokenizer import word_level_clip_tokenizer

    tokenizer = word_level_clip_tokenizer(WORDS, max_length=TOKENS)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, projection_dim=width,
                            intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model, tokenizer


def tiny_vae():
    """64 px ↔ a 4×32×32 latent, with a shift factor as SD3's and FLUX's VAEs have."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                         sample_size=64, scaling_factor=1.5, shift_factor=0.1,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3(seed: int = 0):
    """SD3-shaped components: an MMDiT of one joint block on 2×2 patches, two CLIP encoders
    of width 8 (hidden states 8 + 8, padded to T5's 16; pooled 8 + 8) and a T5 of width 16."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=32)
    clip_l, tokenizer = tiny_clip(with_projection=True)
    clip_g, tokenizer_2 = tiny_clip(with_projection=True)
    tokenizer_3 = word_level_t5_tokenizer(WORDS, max_length=TOKENS)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(), text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
        tokenizer_2=tokenizer_2, text_encoder_3=tiny_t5(tokenizer_3, 16),
        tokenizer_3=tokenizer_3)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd3"
    build_tiny_sd3().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def backend(sd3_dir):
    return load_backend(str(sd3_dir))


@pytest.fixture(scope="module")
def x0(backend):
    return backend.encode_image(to_square(make_photo(), backend.resolution))


# ------------------------------------------------------------------- helpers both families use


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def eval_loss(backend, x0, cond, draws=32, seed=123) -> float:
    """L(x0, e, θ) on a fixed set of (σ, ε) draws, so two values are comparable."""
    with torch.no_grad():
        return backend.loss(x0, cond, torch.Generator().manual_seed(seed), batch=draws).item()


def state(backend) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline: transformer, VAE and every text encoder."""
    modules = {"transformer": backend.unet, "vae": backend.vae, **backend.text_encoders()}
    return {f"{m}.{k}": v.detach().clone() for m, module in modules.items()
            for k, v in module.state_dict().items()}


def unchanged(before, backend) -> bool:
    now = state(backend)
    return now.keys() == before.keys() and all(torch.equal(v, now[k]) for k, v in before.items())


def check_stage1(backend, x0):
    before = state(backend)
    e_tgt = backend.encode_text([TEXT])
    assert e_tgt.pooled is not None
    e_opt, _ = optimize_embedding(backend, x0, e_tgt, QUICK, quiet=True)
    assert eval_loss(backend, x0, e_opt) < eval_loss(backend, x0, e_tgt)
    assert not torch.equal(e_opt.pooled, e_tgt.pooled)  # the pooled part is optimized too
    assert unchanged(before, backend)


def check_stage2(backend, x0, mode):
    before = state(backend)
    e = backend.encode_text([TEXT])
    start = eval_loss(backend, x0, e)
    finetune(backend, x0, e, replace(QUICK, finetune=mode), quiet=True)
    assert eval_loss(backend, x0, e) < start
    delta = backend.take_delta()
    assert delta.kind == mode and delta.tensors
    assert unchanged(before, backend)  # bit for bit, and no adapter left behind
    assert eval_loss(backend, x0, e) == start
    shapes = backend.delta_shapes(mode, delta.lora_rank)
    assert all(tuple(v.shape) == shapes[k] for k, v in delta.tensors.items())
    with backend.apply_delta(delta):
        assert eval_loss(backend, x0, e) < start
    assert unchanged(before, backend)


def check_eta_extremes(backend):
    """At η = 0 and η = 1 the transformer is conditioned on exactly e_opt and e_tgt."""
    editor = Imagic(backend, replace(QUICK, embed_steps=3, finetune_steps=2, sample_steps=1,
                                     etas=(0.0, 1.0), sample_batch=1), quiet=True)
    session = editor.fit(make_photo(), TEXT)
    assert not torch.equal(session.e_opt.pooled, session.e_tgt.pooled)
    seen = []

    def record(module, args, kwargs):
        rows = kwargs["encoder_hidden_states"].shape[0]
        seen.append((kwargs["encoder_hidden_states"][rows - 1].clone(),
                     kwargs["pooled_projections"][rows - 1].clone()))

    hook = backend.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        editor.generate(session)
    finally:
        hook.remove()
    assert len(seen) == 2  # one step for each η, its conditional row last
    for (hidden, pooled), expected in zip(seen, (session.e_opt, session.e_tgt)):
        assert torch.equal(hidden.cpu(), expected.hidden_states[0])
        assert torch.equal(pooled.cpu(), expected.pooled[0])


def check_cli_edit_and_rerender(capsys, tmp_path, model_dir, photo_path, family):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, TEXT, "--model", model_dir, "--eta", "0,1",
                       "--out", out, *CLI_FAST)
    assert code == 0, err
    manifest = json.loads((out / "session" / "manifest.json").read_text())
    assert manifest["model"]["family"] == family
    images = sorted(out.glob("eta*.png"))
    assert [p.name for p in images] == ["eta0.00_seed0.png", "eta1.00_seed0.png"]
    code, _, err = run(capsys, "generate", out / "session", "--out", tmp_path / "again",
                        "--quiet")
    assert code == 0, err
    for image in images:
        np.testing.assert_array_equal(np.asarray(Image.open(image)),
                                      np.asarray(Image.open(tmp_path / "again" / image.name)))
    code, text, _ = run(capsys, "info", model_dir, "--json")
    info = json.loads(text)
    assert code == 0 and info["family"] == family and info["prediction_type"] == "flow"
    assert info["resolution"] == 64
    assert info["parameters"]["transformer"] > 0 and info["parameters"]["vae"] > 0
    return out


def check_one_line_error(capsys, *args, match: str):
    code, _, err = run(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err


# ------------------------------------------------------------------- SD3


def test_cli_edit_info_and_bit_exact_rerender(capsys, tmp_path, sd3_dir, photo_path):
    out = check_cli_edit_and_rerender(capsys, tmp_path, sd3_dir, photo_path, "sd3")
    assert json.loads((out / "manifest.json").read_text())["config"]["guidance"] == 7.0  # preset


def test_stage1_lowers_the_loss_and_leaves_the_model_alone(backend, x0):
    check_stage1(backend, x0)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage2_lowers_the_loss_then_restores_the_base_model(backend, x0, mode):
    check_stage2(backend, x0, mode)


def test_eta_0_and_1_condition_on_e_opt_and_e_tgt_exactly(backend):
    check_eta_extremes(backend)


def test_loss_is_flow_matching_with_logit_normal_sigmas(backend, x0):
    """x_σ = (1 − σ)·x0 + σ·ε, target ε − x0, σ = the scheduler's training sigma at index
    ⌊1000·sigmoid(N(0, 1))⌋, as train_dreambooth_lora_sd3.py draws them."""
    e = backend.encode_text([TEXT])
    loss = backend.loss(x0, e, torch.Generator().manual_seed(7), batch=3)
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=g))
    index = (u * 1000).long()
    noise = torch.randn((3, *x0.shape[1:]), generator=g)
    sigma = backend.noise_scheduler.sigmas[index].view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        v = backend.unet(hidden_states=x_t, timestep=sigma.flatten() * 1000,
                         encoder_hidden_states=e.hidden_states.expand(3, -1, -1),
                         pooled_projections=e.pooled.expand(3, -1)).sample
    torch.testing.assert_close(loss, torch.mean((v - (noise - x0)) ** 2), rtol=1e-4, atol=1e-6)
    assert backend.noise_scheduler.config.shift == 3.0  # the training sigmas are SD3's shifted


def test_text_embedding_has_clip_then_t5_tokens_and_pooled_clip(backend):
    e = backend.encode_text([TEXT, "a red cat"])
    assert tuple(e.hidden_states.shape) == (2, TOKENS + TOKENS, 16)
    assert tuple(e.pooled.shape) == (2, 16)


def test_a_folder_of_another_family_fails_in_one_line(capsys, tmp_path, sd3_dir, photo_path):
    """model_index.json says SD3, the transformer is FLUX's: one line, exit 2, whether the
    index names SD3's transformer class (diffusers refuses the weights) or FLUX's (the
    pipeline cannot be built)."""
    from test_flux import build_tiny_flux

    fake = tmp_path / "fake-sd3"
    shutil.copytree(sd3_dir, fake)
    shutil.rmtree(fake / "transformer")
    build_tiny_flux().transformer.save_pretrained(fake / "transformer")
    check_one_line_error(capsys, "info", fake, match="could not load")
    index = json.loads((fake / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (fake / "model_index.json").write_text(json.dumps(index))
    check_one_line_error(capsys, "info", fake, match="could not load")


def test_a_missing_text_encoder_fails_in_one_line(capsys, tmp_path, sd3_dir):
    broken = tmp_path / "no-clip-g"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    check_one_line_error(capsys, "info", broken, match="has no text_encoder_2")
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index | {"text_encoder_2": [None, None]}))
    check_one_line_error(capsys, "info", broken, match="text_encoder_2")
