"""DeepFloyd IF (IF-I + IF-II) through the engine, on tiny random components built here with IF's
structure: learned variance (6 output channels), IF-II reading the upscaled image beside x_t and
the noise level as class label, a T5 encoder and a word-level T5-style tokenizer. Nothing is
downloaded. The two stages are saved side by side, as `huggingface-cli download --local-dir`
leaves them, so `--model IF_I_FOLDER` finds IF-II beside it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_photo
from imagic import EditConfig, EditSession, Imagic, load_backend
from imagic.backends.deepfloyd_if import SR_STAGE, DeepFloydIFBackend
from imagic.cli import main
from imagic.editor import finetune, optimize_embedding
from imagic.errors import ModelError
from imagic.presets import PRESETS
from imagic.tokenizer import word_level_t5_tokenizer

WORDS = ["a", "photo", "of", "the", "dog", "cat", "sitting", "standing", "red", "blue", "with",
         "hat", "on", "grass"]
TEXT = "a photo of a sitting dog"
BASE, SIDE = 8, 32  # IF-I's and IF-II's resolutions (IF: 64 and 256)
T5_WIDTH = 8
RECIPE = EditConfig(embed_steps=2, finetune_steps=2, aux_finetune_steps=2, finetune_lr=1e-3,
                    aux_finetune_lr=1e-3, sample_steps=3, etas=(0.0, 1.0), seeds=(0, 1),
                    guidance=2.0)
FAST = ["--embed-steps", "2", "--finetune-steps", "2", "--aux-finetune-steps", "2",
        "--sample-steps", "2", "--quiet"]


def tiny_unet(super_resolution: bool):
    """A 2-block UNet of IF's kind: ResNet up/down blocks, simple cross-attention with the
    text projected from T5's width, attention-pooled text in the time embedding."""
    from diffusers import UNet2DConditionModel

    extra = dict(class_embed_type="timestep", resnet_skip_time_act=True,
                 mid_block_scale_factor=1.414, resnet_out_scale_factor=1.414)
    return UNet2DConditionModel(
        sample_size=SIDE if super_resolution else BASE, in_channels=6 if super_resolution else 3,
        out_channels=6, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,  # norm_cross: 32 groups
        encoder_hid_dim=T5_WIDTH, encoder_hid_dim_type="text_proj", addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu",
        **(extra if super_resolution else {}),
    )


def build_tiny_if(seed: int = 0):
    """(IFPipeline, IFSuperResolutionPipeline) with the schedulers diffusers' IF conversion
    writes (scripts/convert_if.py)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = word_level_t5_tokenizer(WORDS)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    learned = dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
                   prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95)
    if_i = IFPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=tiny_unet(False),
        scheduler=DDPMScheduler(**learned, sample_max_value=1.5), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if_ii = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=tiny_unet(True),
        scheduler=DDPMScheduler(**learned, sample_max_value=1.0),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        safety_checker=None, feature_extractor=None, watermarker=None,
        requires_safety_checker=False)
    return if_i, if_ii


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """IF-I and IF-II saved side by side; the IF-I folder is what --model names."""
    root = tmp_path_factory.mktemp("deepfloyd")
    if_i, if_ii = build_tiny_if()
    if_i.save_pretrained(root / "IF-I-tiny", safe_serialization=True)
    if_ii.save_pretrained(root / "IF-II-tiny", safe_serialization=True)
    return root


@pytest.fixture
def backend(models):
    return load_backend(str(models / "IF-I-tiny"), device="cpu")


@pytest.fixture(scope="module")
def photo():
    return make_photo((80, 64)).resize((SIDE, SIDE))


def stage_weights(backend) -> dict[str, torch.Tensor]:
    modules = {**backend.stage_unets(), "text_encoder": backend.text_encoder}
    return {f"{stage}/{k}": v.clone() for stage, module in modules.items()
            for k, v in module.state_dict().items()}


def test_loads_as_a_cascade_of_if_i_and_if_ii(backend, models):
    assert isinstance(backend, DeepFloydIFBackend)
    assert backend.auxiliary_stages == (SR_STAGE,)
    assert (backend.resolution, backend.output_resolution) == (BASE, SIDE)
    assert backend.default_preset == "deepfloyd-if" and "deepfloyd-if" in PRESETS
    assert backend.max_text_tokens == 77  # IF's encode_prompt length
    source = backend.identity["source"]  # both stages, so a session can load them again
    assert source == f"{models / 'IF-I-tiny'}+{models / 'IF-II-tiny'}"
    # the "+" form names the same pair
    again = load_backend(source, device="cpu")
    assert again.identity["fingerprint"] == backend.identity["fingerprint"]


def test_text_is_t5_hidden_states_with_the_attention_mask(backend):
    e = backend.encode_text([TEXT, "A Photo Of A Sitting Dog "])
    assert e.hidden_states.shape == (2, 77, T5_WIDTH) and e.pooled is None
    torch.testing.assert_close(e.hidden_states[0], e.hidden_states[1])  # lower-cased, stripped
    tokens = backend.tokenizer([TEXT], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        masked = backend.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    torch.testing.assert_close(e.hidden_states[:1], masked)
    assert backend.count_text_tokens(TEXT) == len(TEXT.split()) + 1  # words and </s>


def test_predict_reads_the_eps_half_and_the_conditioning_image(backend):
    """IF-II's input is x_t beside the 8 px image upscaled to 32 px and noised at the level it
    reads as class label; another image, another prediction."""
    x0 = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    g = torch.Generator().manual_seed(0)
    t, noise, level, image_noise = backend.draw(x0, g, batch=2, stage=SR_STAGE)
    assert image_noise.shape == (2, 3, SIDE, SIDE) and int(level.max()) <= 250
    e = backend.encode_text([TEXT]).map(lambda v: v.expand(2, -1, -1))
    low = torch.nn.functional.interpolate(x0, size=(BASE, BASE), mode="area").expand(2, -1, -1, -1)
    extra = backend.conditioning(SR_STAGE, low, level, image_noise)
    assert extra[0].shape == (2, 3, SIDE, SIDE)
    with torch.no_grad():
        x_t = backend.noise_scheduler.add_noise(x0.expand(2, -1, -1, -1), noise, t)
        eps = backend.predict(SR_STAGE, x_t, t, e, extra)
        full = backend.stages[SR_STAGE].unet(torch.cat([x_t, extra[0]], 1), t,
                                             encoder_hidden_states=e.hidden_states,
                                             class_labels=level).sample
        other = backend.predict(SR_STAGE, x_t, t, e, (extra[0].flip(-1), level))
        base = backend.predict("base", torch.randn(2, 3, BASE, BASE), t, e)
    assert full.shape[1] == 6 and eps.shape == (2, 3, SIDE, SIDE) and base.shape[1] == 3
    torch.testing.assert_close(eps, full[:, :3])
    assert not torch.equal(eps, other)


def test_stage_1_and_stage_2_each_lower_a_fixed_draw_loss(backend, photo):
    config = EditConfig(embed_steps=8, embed_lr=5e-2, finetune_steps=8, finetune_lr=1e-3,
                        aux_finetune_steps=8, aux_finetune_lr=1e-3, timesteps_per_step=4)
    x0 = backend.encode_image(photo)
    x0_sr = backend.encode_image(photo, SR_STAGE)
    assert (x0.shape[-1], x0_sr.shape[-1]) == (BASE, SIDE)
    e_tgt = backend.encode_text([TEXT])
    fixed = backend.draw(x0, torch.Generator().manual_seed(123), batch=16)
    fixed_sr = backend.draw(x0_sr, torch.Generator().manual_seed(123), batch=16, stage=SR_STAGE)

    def loss(cond, stage="base"):
        with torch.no_grad():
            if stage == "base":
                return float(backend.loss_at(x0, cond, *fixed))
            return float(backend.loss_at(x0_sr, cond, *fixed_sr, stage=stage))

    before = loss(e_tgt)
    e_opt, _ = optimize_embedding(backend, x0, e_tgt, config, quiet=True)
    assert loss(e_opt) < before  # stage 1
    before, before_sr = loss(e_opt), loss(e_tgt, SR_STAGE)
    finetune(backend, x0, e_opt, config, quiet=True)
    finetune(backend, x0_sr, e_tgt, config, stage=SR_STAGE, quiet=True)
    assert loss(e_opt) < before  # stage 2, IF-I
    assert loss(e_tgt, SR_STAGE) < before_sr  # stage 2, IF-II
    backend.take_delta()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_edit_gives_every_weight_back_and_re_renders_bit_for_bit(backend, photo, mode,
                                                                   tmp_path, monkeypatch):
    before = stage_weights(backend)
    config = RECIPE if mode == "full" else RECIPE.with_options(finetune="lora")
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(photo, TEXT)
    assert set(session.losses) == {"stage1", "stage2", f"stage2_{SR_STAGE}"}
    stages = {name.rpartition("/")[0] or "base" for name in session.delta.tensors}
    assert stages == {"base", SR_STAGE}  # both stages were fine-tuned
    # η = 0 samples IF-I at e_opt, η = 1 at e_tgt, exactly; IF-II at e_tgt
    seen = {}
    sample_base, upsample = DeepFloydIFBackend.sample_base, DeepFloydIFBackend.upsample

    def spy_base(self, conds, *args, **kwargs):
        seen.setdefault("base", conds.hidden_states.clone())
        return sample_base(self, conds, *args, **kwargs)

    def spy_upsample(self, stage, low, conds, *args, **kwargs):
        seen.setdefault(stage, conds.hidden_states.clone())
        return upsample(self, stage, low, conds, *args, **kwargs)

    monkeypatch.setattr(DeepFloydIFBackend, "sample_base", spy_base)
    monkeypatch.setattr(DeepFloydIFBackend, "upsample", spy_upsample)
    images = editor.generate(session)
    assert [(im.eta, im.seed) for im in images[:2]] == [(0.0, 0), (1.0, 0)]
    assert torch.equal(seen["base"][0], session.e_opt.hidden_states[0])
    assert torch.equal(seen["base"][1], session.e_tgt.hidden_states[0])
    assert all(torch.equal(row, session.e_tgt.hidden_states[0]) for row in seen[SR_STAGE])
    assert [im.image.size for im in images] == [(SIDE, SIDE)] * 4
    after = stage_weights(backend)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # exactly the loaded model
    session.save(tmp_path / "session")
    again = editor.generate(EditSession.load(tmp_path / "session"))
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(images, again))


def test_an_inversion_start_starts_if_ii_from_its_own_inversion_of_the_input(backend, photo,
                                                                           monkeypatch):
    """With start "inversion", IF-II starts from the input run up its own schedule (its
    sampler config, beside the input's 64 px image), not from noise, and renders the same
    pictures again."""
    editor = Imagic(backend, RECIPE, quiet=True)
    session = editor.fit(photo, TEXT)
    inversions, starts = [], []
    stage_inversion, denoise = DeepFloydIFBackend.stage_inversion, DeepFloydIFBackend.denoise

    def spy(self, stage, image, *args):
        inversions.append((stage, image, args[-1]))
        x_t = stage_inversion(self, stage, image, *args)
        starts.append(x_t.clone())
        return x_t

    def spy_denoise(self, stage, scheduler, x, *args, **kwargs):
        if stage == SR_STAGE:
            starts.append(x.clone())
        return denoise(self, stage, scheduler, x, *args, **kwargs)

    monkeypatch.setattr(DeepFloydIFBackend, "stage_inversion", spy)
    monkeypatch.setattr(DeepFloydIFBackend, "denoise", spy_denoise)
    first = editor.generate(session, etas=[0.5, 1.0], seeds=[0], start="inversion")
    assert inversions == [(SR_STAGE, session.input_image, backend.sr_sampler_config)]
    assert torch.equal(starts[0], starts[1])  # IF-II's sampler starts at the inversion
    again = editor.generate(session, etas=[0.5, 1.0], seeds=[0], start="inversion")
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(first, again))


def test_cli_edit_runs_both_stages_and_generate_re_renders_it(models, photo_path, tmp_path):
    out = tmp_path / "out"
    assert main(["edit", str(photo_path), TEXT, "--model", str(models / "IF-I-tiny"),
                 "--eta", "0.5,1", "--seeds", "0", "--out", str(out), *FAST]) == 0
    manifest = json.loads((out / "session" / "manifest.json").read_text())
    assert manifest["model"]["family"] == "deepfloyd-if"
    assert set(manifest["losses"]) == {"stage1", "stage2", f"stage2_{SR_STAGE}"}
    rendered = tmp_path / "again"
    assert main(["generate", str(out / "session"), "--out", str(rendered), "--quiet"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 2
    for name in pngs:
        first, second = np.asarray(_open(out / name)), np.asarray(_open(rendered / name))
        assert first.shape == (SIDE, SIDE, 3) and np.array_equal(first, second)


def test_if_ii_refuses_fine_tuning_on_crops_before_training(models, photo_path, tmp_path,
                                                          capsys):
    """IF-II has self-attention: what it learns from a crop is not what the whole image needs."""
    out = tmp_path / "out"
    assert main(["edit", str(photo_path), TEXT, "--model", str(models / "IF-I-tiny"),
                 "--out", str(out), "--aux-finetune-crop", "64", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "self-attention" in err[0] and "aux_finetune_crop" in err[0]
    assert not out.exists()


def test_info_names_the_family_resolutions_and_parameters(models, capsys):
    assert main(["info", str(models / "IF-I-tiny"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "deepfloyd-if" and info["prediction_type"] == "epsilon"
    assert (info["resolution"], info["output_resolution"]) == (BASE, SIDE)
    assert set(info["parameters"]) == {"unet", "text_encoder", SR_STAGE}
    assert all(n > 0 for n in info["parameters"].values())
    assert info["stages"][SR_STAGE]["noise_level"] == 250


def test_bad_models_exit_2_with_one_line(models, tiny_model_dir, photo_path, tmp_path, capsys):
    if_i, if_ii = models / "IF-I-tiny", models / "IF-II-tiny"
    no_encoder = tmp_path / "IF-I-no-encoder"
    shutil.copytree(if_i, no_encoder)
    shutil.rmtree(no_encoder / "text_encoder")
    cases = {
        f"{if_i}+{tiny_model_dir}": "StableDiffusionPipeline folder, not DeepFloyd IF-II",
        f"{tiny_model_dir}+{if_ii}": "StableDiffusionPipeline folder, not DeepFloyd IF-I",
        f"{no_encoder}+{if_ii}": "has no text encoder",
        str(if_ii): "name IF-I first",
        f"{if_i}+{tmp_path / 'missing'}": "model not found",
        "DeepFloyd/IF-I-XL-v1.0": "could not load 'DeepFloyd/IF-I-XL-v1.0'",  # offline, no cache
    }
    for model, message in cases.items():
        code = main(["edit", str(photo_path), TEXT, "--model", model, "--out",
                     str(tmp_path / "o"), *FAST])
        err = capsys.readouterr().err
        assert code == 2, model
        assert message in err and len(err.strip().splitlines()) == 1, err
    lonely = tmp_path / "lonely" / "IF-I"
    shutil.copytree(if_i, lonely)
    with pytest.raises(ModelError, match="no DeepFloyd IF-II folder beside"):
        load_backend(str(lonely), device="cpu")


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_random_if_has_the_if_i_xl_and_if_ii_l_architectures():
    """The benchmark's model, on the meta device: IF-I-XL's 4.3B and IF-II-L's 1.2B parameters
    (their model cards' counts), T5-XXL's 4096-wide text, 64 px then 256 px."""
    path = Path(__file__).parents[1] / "benchmarks" / "families" / "deepfloyd_if.py"
    spec = importlib.util.spec_from_file_location("benchmark_deepfloyd_if", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    backend = benchmark.random_if("meta")
    assert backend.parameter_counts() == benchmark.PARAMETERS
    # what `imagic info` says stage 2 holds on a GPU: both UNets train in fp32 (a full
    # fine-tune with gradients and two Adam states), T5 waits in bf16
    real = benchmark.PARAMETERS
    trained = real["unet"] + real[SR_STAGE]
    assert backend.stage2_memory() == {
        "full": round((16 * trained + 2 * real["text_encoder"]) / 1e9, 2),
        "lora": round((4 * trained + 2 * real["text_encoder"]) / 1e9, 2)}
    assert (backend.resolution, backend.output_resolution) == (64, 256)
    assert backend.unet.config.encoder_hid_dim == 4096 == backend.text_encoder.config.d_model
    assert backend.stages[SR_STAGE].unet.config.class_embed_type == "timestep"


def test_a_sentencepiece_only_t5_tokenizer_loads_as_deepfloyds_folders_ship_it(models, tmp_path):
    """DeepFloyd's IF-I folders hold T5's tokenizer as spiece.model alone (no tokenizer.json);
    imagic's dependencies read it."""
    import io

    import sentencepiece
    from transformers import T5Tokenizer

    folder = tmp_path / "IF-I-spiece"
    shutil.copytree(models / "IF-I-tiny", folder)
    shutil.copytree(models / "IF-II-tiny", tmp_path / "IF-II-tiny")
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a cat sat", "a sad cat"] * 20),  # ids below the tiny T5's
        model_writer=spm, vocab_size=10, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, minloglevel=2)
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "spiece.model").write_bytes(spm.getvalue())
    T5Tokenizer(vocab_file=str(folder / "tokenizer" / "spiece.model"), extra_ids=0,
                model_max_length=77).save_pretrained(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "T5Tokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    backend = load_backend(str(folder), device="cpu")
    cond = backend.encode_text(["a cat sat"])
    assert torch.isfinite(cond.hidden_states).all()
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "spiece.model", "tokenizer_config.json"]
