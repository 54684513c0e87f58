"""FLUX.1 on tiny random components built here (dev's architecture: a guidance embedding): a
whole CLI edit, both stages lowering a fixed-draw loss (LoRA by default, full too), the base
weights untouched, sessions re-rendering bit for bit, η = 0 and 1 meeting the transformer as
e_opt and e_tgt, the flow-matching loss on packed latents, and bad inputs failing in one line."""

import shutil

import pytest
import torch

from conftest import WORDS, make_photo
from imagic import load_backend
from imagic.images import to_square
from imagic.tokenizer import word_level_t5_tokenizer
from test_sd3 import (
    CLI_FAST,
    TEXT,
    TOKENS,
    check_cli_edit_and_rerender,
    check_eta_extremes,
    check_one_line_error,
    check_stage1,
    check_stage2,
    run,
    tiny_clip,
    tiny_t5,
    tiny_vae,
)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """FLUX-shaped components: one double- and one single-stream block on 2×2-packed latents
    (4 channels → 16), CLIP-L of width 8 (pooled) and a T5 of width 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    clip, tokenizer = tiny_clip(with_projection=False)
    tokenizer_2 = word_level_t5_tokenizer(WORDS, max_length=TOKENS)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1's scheduler config
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(),
                        text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(tokenizer_2, 16), tokenizer_2=tokenizer_2)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-flux"
    build_tiny_flux().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def backend(flux_dir):
    return load_backend(str(flux_dir))


@pytest.fixture(scope="module")
def x0(backend):
    return backend.encode_image(to_square(make_photo(), backend.resolution))


def test_cli_edit_info_and_bit_exact_rerender(capsys, tmp_path, flux_dir, photo_path):
    import json

    out = check_cli_edit_and_rerender(capsys, tmp_path, flux_dir, photo_path, "flux")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["finetune"] == "lora"  # the flux preset: LoRA by default
    assert manifest["config"]["gradient_checkpointing"] is True


def test_stage1_lowers_the_loss_and_leaves_the_model_alone(backend, x0):
    check_stage1(backend, x0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage2_lowers_the_loss_then_restores_the_base_model(backend, x0, mode):
    check_stage2(backend, x0, mode)


def test_eta_0_and_1_condition_on_e_opt_and_e_tgt_exactly(backend):
    check_eta_extremes(backend)


def test_loss_is_flow_matching_on_packed_latents(backend, x0):
    """σ index uniform (train_dreambooth_lora_flux.py's weighting "none"), x_σ = (1 − σ)·x0 + σ·ε
    packed 2×2, t = σ, guidance embedding 3.5, target ε − x0."""
    from diffusers import FluxPipeline

    e = backend.encode_text([TEXT])
    loss = backend.loss(x0, e, torch.Generator().manual_seed(7), batch=2)
    g = torch.Generator().manual_seed(7)
    index = (torch.rand((2,), generator=g) * 1000).long()
    noise = torch.randn((2, *x0.shape[1:]), generator=g)
    sigma = backend.noise_scheduler.sigmas[index].view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    _, c, h, w = x_t.shape
    with torch.no_grad():
        v = backend.unet(
            hidden_states=FluxPipeline._pack_latents(x_t, 2, c, h, w), timestep=sigma.flatten(),
            guidance=torch.full((2,), 3.5), pooled_projections=e.pooled.expand(2, -1),
            encoder_hidden_states=e.hidden_states.expand(2, -1, -1),
            txt_ids=torch.zeros(TOKENS, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu",
                                                           torch.float32)).sample
    v = FluxPipeline._unpack_latents(v, h * 2, w * 2, 2)
    torch.testing.assert_close(loss, torch.mean((v - (noise - x0)) ** 2), rtol=1e-4, atol=1e-6)


def test_text_embedding_is_t5_states_and_pooled_clip(backend):
    e = backend.encode_text([TEXT])
    assert tuple(e.hidden_states.shape) == (1, TOKENS, 16)
    assert tuple(e.pooled.shape) == (1, 8)


def test_schnell_has_no_guidance_embedding_and_its_own_preset(tmp_path, photo_path, capsys):
    path = tmp_path / "tiny-schnell"
    build_tiny_flux(seed=1, guidance_embeds=False).save_pretrained(path, safe_serialization=True)
    assert load_backend(str(path)).default_preset == "flux-schnell"
    code, _, err = run(capsys, "edit", photo_path, TEXT, "--model", path, "--eta", "1",
                       "--out", tmp_path / "out", "--no-session", *CLI_FAST)
    assert code == 0, err


def test_a_session_of_another_family_is_refused_in_one_line(capsys, tmp_path, flux_dir,
                                                             photo_path):
    from test_sd3 import build_tiny_sd3

    sd3 = tmp_path / "tiny-sd3"
    build_tiny_sd3().save_pretrained(sd3, safe_serialization=True)
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, TEXT, "--model", flux_dir, "--eta", "1",
                       "--out", out, *CLI_FAST)
    assert code == 0, err
    check_one_line_error(capsys, "generate", out / "session", "--model", sd3, "--out",
                         tmp_path / "again", match="different one")


def test_a_missing_t5_fails_in_one_line(capsys, tmp_path, flux_dir):
    import json

    broken = tmp_path / "no-t5"
    shutil.copytree(flux_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index | {"text_encoder_2": [None, None]}))
    shutil.rmtree(broken / "text_encoder_2")
    check_one_line_error(capsys, "info", broken, match="text_encoder_2")


def test_info_says_what_stage_2_holds_on_a_gpu_without_t5(backend, monkeypatch):
    """`imagic info`'s estimate at FLUX.1-dev's real sizes: the transformer trains (fp32, and
    for a full fine-tune its gradients and two Adam states), CLIP and the VAE wait in bf16, and
    T5, which leaves the GPU after encoding, is not counted."""
    real = {"transformer": 11_901_408_320, "text_encoder": 123_060_480,
            "text_encoder_2": 4_762_310_656, "vae": 83_819_683}
    monkeypatch.setattr(backend, "parameter_counts", lambda: real)
    frozen = real["text_encoder"] + real["vae"]
    assert backend.info()["stage2_gpu_gb"] == {
        "full": round((16 * real["transformer"] + 2 * frozen) / 1e9, 2),
        "lora": round((4 * real["transformer"] + 2 * frozen) / 1e9, 2)}
