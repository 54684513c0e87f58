"""SDXL on a tiny random pipeline built here: e and the UNet call as diffusers' pipeline makes
them, both stages lower the loss, the base model is never changed, sessions re-render bit for
bit, η's ends are e_opt and e_tgt exactly (pooled part included), the CLI runs a whole edit, and
bad folders and files are one line, exit 2. The real architecture's configs are checked on the
"meta" device."""

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENS, WORDS, make_photo
from imagic import EditConfig, EditSession, Imagic, load_backend
from imagic.backends.sdxl import SINGLE_FILE_KEY, SDXLBackend, is_sdxl, load_sdxl
from imagic.cli import main
from imagic.editor import finetune, interpolate, optimize_embedding
from imagic.errors import ModelError
from imagic.images import to_square
from imagic.presets import get_preset

TEXT = "a photo of a sitting dog"
QUICK = EditConfig(embed_steps=20, embed_lr=5e-2, finetune_steps=20, finetune_lr=2e-3,
                   lora_lr=5e-2, timesteps_per_step=2, sample_steps=3, seeds=(0,),
                   etas=(0.0, 1.0))
FAST = ["--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "2", "--quiet"]


def load_benchmark():
    """benchmarks/families/sdxl.py, which holds SDXL base 1.0's published configs."""
    path = Path(__file__).parents[1] / "benchmarks" / "families" / "sdxl.py"
    spec = importlib.util.spec_from_file_location("benchmark_sdxl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCHMARK = load_benchmark()


def build_tiny_sdxl(seed: int = 0):
    """SDXL-shaped components small enough for a CPU: a 64 px image, a 4×32×32 latent, two text
    encoders of width 8 (cross-attention 16, pooled 8) and SDXL base's noise schedule."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagic.tokenizer import word_level_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 8,  # six time ids of 8, pooled 8
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = word_level_clip_tokenizer(WORDS, max_length=TOKENS)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=8, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
        tokenizer_2=word_level_clip_tokenizer(WORDS, max_length=TOKENS), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(BENCHMARK.SCHEDULER),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: these tiny models run faster so, and far faster on a busy machine, where
    a second thread waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    build_tiny_sdxl().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def backend(sdxl_dir):
    return load_backend(str(sdxl_dir))


@pytest.fixture(scope="module")
def x0(backend):
    return backend.encode_image(to_square(make_photo(), backend.resolution))


def eval_loss(backend, x0, cond, draws=32, seed=123) -> float:
    """L(x0, e, θ) on one fixed set of (t, ε) draws, so two values are comparable."""
    with torch.no_grad():
        return backend.loss(x0, cond, torch.Generator().manual_seed(seed), batch=draws).item()


def state(backend):
    return {f"{m}.{k}": v.detach().clone() for m in ("unet", "vae", "text_encoder",
                                                     "text_encoder_2")
            for k, v in getattr(backend, m).state_dict().items()}


def unchanged(before, backend) -> bool:
    now = state(backend)
    return now.keys() == before.keys() and all(torch.equal(v, now[k]) for k, v in before.items())


def test_the_folder_loads_as_sdxl_with_its_own_preset(backend):
    assert isinstance(backend, SDXLBackend) and backend.family == "sdxl"
    assert backend.default_preset == "sdxl" and backend.resolution == 64
    assert backend.vae.dtype == torch.float32  # force_upcast: SDXL's VAE stays in float32
    assert backend.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    preset = get_preset("sdxl")
    assert preset.timesteps_per_step > 1 and preset.gradient_checkpointing  # `fast`'s K steps
    assert preset.embed_steps * preset.timesteps_per_step == 1000  # the paper's samples
    assert preset.finetune_steps * preset.timesteps_per_step == 1500


def test_e_and_sampling_are_the_pipelines(sdxl_dir, backend):
    """encode_text gives encode_prompt's e (hidden states and pooled; zeros for the empty
    text), and stage 3 on the base model gives the pipeline's own latents."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    hidden, negative, pooled, negative_pooled = pipe.encode_prompt(
        TEXT, device="cpu", do_classifier_free_guidance=True)
    e, uncond = backend.encode_text([TEXT]), backend.encode_text([""])
    torch.testing.assert_close(e.hidden_states, hidden, rtol=0, atol=0)
    torch.testing.assert_close(e.pooled, pooled, rtol=0, atol=0)
    assert e.hidden_states.shape == (1, TOKENS, 16) and e.pooled.shape == (1, 8)
    torch.testing.assert_close(uncond.hidden_states, negative, rtol=0, atol=0)
    torch.testing.assert_close(uncond.pooled, negative_pooled, rtol=0, atol=0)
    assert not uncond.hidden_states.any() and not uncond.pooled.any()

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(7))
    expected = pipe(TEXT, num_inference_steps=3, guidance_scale=5.0, latents=noise.clone(),
                    output_type="latent").images
    ours = backend.sample_base(e, uncond, [torch.Generator().manual_seed(7)], 3, 5.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_stage1_lowers_the_loss_in_both_parts_of_e(backend, x0):
    before = state(backend)
    e_tgt = backend.encode_text([TEXT])
    e_opt, losses = optimize_embedding(backend, x0, e_tgt, QUICK, quiet=True)
    assert len(losses) == QUICK.embed_steps
    assert eval_loss(backend, x0, e_opt) < eval_loss(backend, x0, e_tgt)
    assert not torch.equal(e_opt.hidden_states, e_tgt.hidden_states)
    assert not torch.equal(e_opt.pooled, e_tgt.pooled)  # the pooled embedding is optimized too
    assert unchanged(before, backend)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage2_lowers_the_loss_then_restores_the_base_model(backend, x0, mode):
    before = state(backend)
    e = backend.encode_text([TEXT])
    start = eval_loss(backend, x0, e)
    finetune(backend, x0, e, replace(QUICK, finetune=mode), quiet=True)
    assert eval_loss(backend, x0, e) < start  # while θ' is in place
    delta = backend.take_delta()
    assert delta.kind == mode and delta.tensors
    assert set(delta.tensors) <= set(backend.delta_shapes(mode, delta.lora_rank))
    assert unchanged(before, backend)
    assert eval_loss(backend, x0, e) == start
    with backend.apply_delta(delta):
        assert eval_loss(backend, x0, e) < start
    assert unchanged(before, backend)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_edit_keeps_the_base_model_and_its_session_re_renders_bit_for_bit(backend, tmp_path,
                                                                        mode):
    before = state(backend)
    editor = Imagic(backend, replace(QUICK, embed_steps=4, finetune_steps=4, finetune=mode),
                    quiet=True)
    session = editor.fit(make_photo(), TEXT)
    assert unchanged(before, backend)
    assert set(session.e_opt.tensors()) == {"hidden_states", "pooled"}
    images = [np.asarray(r.image) for r in editor.generate(session)]
    session.save(tmp_path / "session")
    loaded = EditSession.load(tmp_path / "session")
    torch.testing.assert_close(loaded.e_opt.pooled, session.e_opt.pooled, rtol=0, atol=0)
    for a, b in zip([np.asarray(r.image) for r in editor.generate(loaded)], images):
        np.testing.assert_array_equal(a, b)
    assert unchanged(before, backend)


def test_eta_0_and_1_sample_at_e_opt_and_e_tgt_exactly(backend, monkeypatch):
    e_tgt = backend.encode_text([TEXT])
    e_opt = e_tgt.map(lambda v: v + torch.randn(v.shape, generator=torch.Generator()))
    for eta, end in ((0.0, e_opt), (1.0, e_tgt)):
        mixed = interpolate(e_tgt, e_opt, eta)
        assert mixed.tensors().keys() == {"hidden_states", "pooled"}
        for name, value in mixed.tensors().items():
            assert torch.equal(value, end.tensors()[name]), (eta, name)
    # and stage 3 hands exactly those to the sampler, pooled part included
    session = Imagic(backend, replace(QUICK, embed_steps=2, finetune_steps=2),
                     quiet=True).fit(make_photo(), TEXT)
    seen = []
    sample = backend.sample
    monkeypatch.setattr(backend, "sample", lambda conds, *a, **k: seen.append(conds) or
                        sample(conds, *a, **k))
    Imagic(backend, session.config, quiet=True).generate(session, etas=[0.0, 1.0])
    (conds,) = seen
    for row, end in enumerate((session.e_opt, session.e_tgt)):
        for name, value in end.tensors().items():
            assert torch.equal(conds.tensors()[name][row], value[0]), (row, name)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_edit_info_and_generate(capsys, tmp_path, sdxl_dir, photo_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, TEXT, "--model", sdxl_dir, "--eta", "0,0.7",
                       "--out", out, *FAST)
    assert code == 0, err
    session = json.loads((out / "session" / "manifest.json").read_text())
    assert session["model"]["family"] == "sdxl" and session["model"]["fingerprint"]
    assert session["config"]["guidance"] == get_preset("sdxl").guidance  # its own preset
    code, _, err = run(capsys, "generate", out / "session", "--out", tmp_path / "again",
                       "--quiet")
    assert code == 0, err
    for name in ("eta0.00_seed0.png", "eta0.70_seed0.png"):
        with Image.open(out / name) as a, Image.open(tmp_path / "again" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code, text, err = run(capsys, "info", sdxl_dir, "--json")
    assert code == 0, err
    info = json.loads(text)
    assert (info["family"], info["resolution"], info["prediction_type"]) == ("sdxl", 64,
                                                                             "epsilon")
    assert info["pooled_embedding"] == 8 and info["text_embedding"].startswith("16 ")
    assert set(info["parameters"]) == {"unet", "text_encoder", "text_encoder_2", "vae"}


def one_line_error(capsys, *args, message):
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]


def copy_with(sdxl_dir, tmp_path, name, change=None, remove=None) -> Path:
    """A copy of the tiny SDXL folder with its model_index changed or a part removed."""
    folder = tmp_path / name
    shutil.copytree(sdxl_dir, folder)
    if change:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | change))
    if remove:
        shutil.rmtree(folder / remove)
    return folder


def test_bad_models_are_one_line_exit_2(capsys, tmp_path, sdxl_dir, tiny_model_dir, photo_path):
    edit = ["edit", photo_path, TEXT, *FAST, "--out", tmp_path / "out", "--model"]
    one_line_error(capsys, *edit, copy_with(sdxl_dir, tmp_path, "no-te2", remove="text_encoder_2"),
                   message="missing its text_encoder_2 folder")
    refiner = copy_with(sdxl_dir, tmp_path, "refiner", remove="text_encoder", change={
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]})
    one_line_error(capsys, *edit, refiner, message="not an SDXL base one")
    no_te = copy_with(sdxl_dir, tmp_path, "no-te", change={"text_encoder": [None, None]})
    one_line_error(capsys, *edit, no_te, message="has no text_encoder")
    # a file with SDXL's tensor names is loaded as SDXL, and offline it needs --config
    checkpoint = tmp_path / "sdxl.safetensors"
    from safetensors.torch import save_file

    save_file({SINGLE_FILE_KEY: torch.zeros(2)}, checkpoint)
    assert is_sdxl(str(checkpoint)) and not is_sdxl(str(checkpoint), config=str(tiny_model_dir))
    one_line_error(capsys, *edit, checkpoint, message="as an SDXL checkpoint")
    assert not (tmp_path / "out").exists()
    # a folder of another family, handed to the SDXL loader
    with pytest.raises(ModelError, match="StableDiffusionPipeline model, not an SDXL"):
        load_sdxl(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    assert load_backend(str(tiny_model_dir)).family == "stable-diffusion"  # still SD's path


def test_random_sdxl_has_sdxl_base_architecture():
    """The benchmark's model, on the meta device: SDXL base 1.0's published parameter counts,
    1024 px, a 77×2048 e with a pooled 1280, and time ids for 1024² uncropped."""
    backend = BENCHMARK.random_sdxl("meta")
    assert backend.parameter_counts() == BENCHMARK.PARAMETERS
    assert backend.resolution == 1024 and backend.prediction_type == "epsilon"
    assert backend.unet.config.cross_attention_dim == 2048
    assert backend.text_encoder_2.config.projection_dim == 1280
    assert backend.time_ids.shape == (1, 6) and backend.sampler_config.clip_sample is False
    # `imagic info`: a full stage 2 holds 16 bytes per UNet weight, the rest in bf16; LoRA 4
    frozen = sum(BENCHMARK.PARAMETERS.values()) - BENCHMARK.PARAMETERS["unet"]
    assert backend.stage2_memory() == {
        "full": round((16 * BENCHMARK.PARAMETERS["unet"] + 2 * frozen) / 1e9, 2),
        "lora": round((4 * BENCHMARK.PARAMETERS["unet"] + 2 * frozen) / 1e9, 2)}


def test_ddim_never_clips_sdxl_latents_whatever_the_scheduler_config():
    """DDIM's own default clips x0 to [-1, 1], right for pixels and wrong for latents; an SDXL
    scheduler config that leaves clip_sample out (or sets it) must not clip the latents."""
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_sdxl()
    unsaid = {k: v for k, v in BENCHMARK.SCHEDULER.items() if k != "clip_sample"}
    for config in (unsaid, unsaid | {"clip_sample": True}):
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
        backend = SDXLBackend(pipe, {"source": "tiny"}, torch.device("cpu"), torch.float32)
        assert backend.sampler_config.clip_sample is False
