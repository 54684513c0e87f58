"""The pixel cascade (base + super-resolution stage) through the engine, on a tiny ShapesWorld 2
cascade trained here for a few steps: it loads and samples at 128 px, stage 2 fine-tunes the
super-resolution stage on the input conditioned on e_tgt and gives its weights back exactly, the
session holds every stage's delta and re-renders bit for bit, and the world-2 trainer resumes
exactly; the benchmark of the stage's sampling level compares levels on the same draws."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagic import EditConfig, EditSession, Imagic, load_backend
from imagic.backends.base import TextCond
from imagic.backends.cascade import PixelCascadeBackend, crop, keep_average, resize
from imagic.bench.shapes2 import select_cases
from imagic.errors import InputError, ModelError, SessionError
from imagic.shapes.train import TrainConfig
from imagic.shapes2 import edit_thing, render, sample_scene
from imagic.shapes2.model import SR_STAGE, CascadeConfig, build_models, longest_caption_tokens
from imagic.shapes2.train import CascadeTrainer

TINY = CascadeConfig(base_channels=(8, 16, 16), sr_channels=(8, 8, 16, 16), norm_num_groups=4,
                     text_hidden_size=16, text_layers=1, text_heads=2, attention_head_dim=4,
                     sr_sample_steps=3)
TEXT = "a large red cat sitting on the left"
# a short recipe through both stages of stage 2
RECIPE = EditConfig(embed_steps=2, finetune_steps=2, aux_finetune_steps=3, finetune_lr=1e-3,
                    aux_finetune_lr=1e-3, sample_steps=4, etas=(0.5, 1.0), seeds=(0, 1),
                    guidance=2.0)


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(out=str(out), steps=4, batch_size=2, log_every=1, checkpoint_every=2,
                sample_every=0, sample_steps=2, model=TINY, quiet=True, device="cpu")
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 training steps of the tiny cascade, in one go."""
    out = tmp_path_factory.mktemp("cascade") / "straight"
    CascadeTrainer(tiny_config(out)).run()
    return out


@pytest.fixture
def backend(run):
    return load_backend(str(run / "model"), device="cpu")


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(render(sample_scene(3)))


def benchmark(name: str):
    """benchmarks/NAME.py, imported from its file."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return benchmark("shapes2_sr_level")


def stage_weights(backend) -> dict[str, torch.Tensor]:
    return {f"{stage}/{k}": v.clone() for stage, unet in backend.stage_unets().items()
            for k, v in unet.state_dict().items()}


def test_default_cascade_fits_the_package_and_reads_every_caption():
    unet, sr_unet, text_encoder, tokenizer, _ = build_models()
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, sr_unet, text_encoder)]
    assert sum(sizes) * 4 <= 30e6  # fp32 safetensors, beside the 10 MB first model: <= 40 MB
    assert sr_unet.config.in_channels == 3 + 3  # x_t and the upsampled 32 px image
    assert sr_unet.config.class_embed_type == "timestep"  # the augmentation level
    assert sr_unet.config.only_cross_attention  # no self-attention: it trains on crops
    assert longest_caption_tokens(tokenizer) <= tokenizer.model_max_length


def test_training_crops_every_tensor_at_the_same_place_on_the_stride():
    images = [torch.arange(2 * 128 * 128.0).view(2, 1, 128, 128) + k for k in (0, 0.5)]
    at = torch.tensor([[0.0, 1.0], [0.5, 0.26]])
    a, b = crop(at, 32, 8, *images)
    assert a.shape == b.shape == (2, 1, 32, 32)
    torch.testing.assert_close(b - a, torch.full_like(a, 0.5))  # the same pixels of each
    assert torch.equal(a[0], images[0][0, :, 96:, :32])  # x 0, y at the far edge
    assert torch.equal(a[1], images[0][1, :, 24:56, 48:80])  # offsets on the 8 px grid
    assert crop(at, 128, 8, *images)[0] is images[0]  # a crop of the whole is the whole


def test_the_trainer_draws_the_super_resolution_noise_at_the_crops_side(tmp_path):
    batch = CascadeTrainer(tiny_config(tmp_path / "t")).make_batch(0, 0, 2, 0.0, 1000)
    assert batch["images"].shape == (2, 128, 128, 3)
    assert batch["sr_noise"].shape == (2, 3, TINY.sr_crop, TINY.sr_crop)


def test_export_describes_the_stage_and_loads_as_a_cascade(run, backend):
    meta = json.loads((run / "model" / "imagic_model.json").read_text())
    assert meta["stages"] == TINY.stage_meta()
    assert "date" not in meta["training"]  # a model's files say what it is, not when
    assert isinstance(backend, PixelCascadeBackend)
    assert backend.auxiliary_stages == (SR_STAGE,)
    assert (backend.resolution, backend.output_resolution) == (32, 128)
    assert backend.info()["stages"][SR_STAGE]["resolution"] == 128


def test_loading_warns_of_no_float32_modules_where_the_model_has_none(run):
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    modeling = logging.getLogger("diffusers.models.modeling_utils")
    collect, level = Collect(), modeling.level
    modeling.addHandler(collect)
    modeling.setLevel(logging.WARNING)  # the Python API's default (the CLI quiets it)
    try:
        load_backend(str(run / "model"), device="cpu")
        modeling.warning("There are modules in X that should be kept in float32: ['norm']")
    finally:
        modeling.removeHandler(collect)
        modeling.setLevel(level)
    assert collect.lines == ["There are modules in X that should be kept in float32: ['norm']"]


def test_cascade_samples_128_px_the_same_for_the_same_seed_in_any_batch(backend):
    texts = backend.encode_text([TEXT, "a small blue square on the right"])
    uncond = backend.encode_text([""])
    pair = backend.sample(texts, uncond, [torch.Generator().manual_seed(s) for s in (4, 5)], 3, 2.0)
    alone = backend.sample(TextCond(texts.hidden_states[1:]), uncond,
                           [torch.Generator().manual_seed(5)], 3, 2.0)
    assert [im.size for im in pair] == [(128, 128)] * 2
    np.testing.assert_allclose(np.asarray(pair[1], float), np.asarray(alone[0], float), atol=1)


def test_the_super_resolution_stage_reads_its_conditioning_image(backend):
    """Its input is x_t beside the 32 px image noised and upsampled; another image, another
    prediction (so the stage is conditioned, not a second text-to-image model)."""
    x0 = torch.rand(1, 3, 128, 128) * 2 - 1
    g = torch.Generator().manual_seed(0)
    t, noise, level, low_noise = backend.draw(x0, g, batch=2, stage=SR_STAGE)
    assert level.shape == (2,) and int(level.max()) <= TINY.sr_max_noise_level
    assert low_noise.shape == (2, 3, 32, 32) and noise.shape == (2, 3, 128, 128)
    e = backend.encode_text([TEXT])
    with torch.no_grad():
        same = backend.loss_at(x0, e, t, noise, level, low_noise, stage=SR_STAGE)
        again = backend.loss_at(x0, e, t, noise, level, low_noise, stage=SR_STAGE)
        other = backend.loss_at(x0.flip(-1), e, t, noise, level, low_noise, stage=SR_STAGE)
    assert float(same) == float(again) and float(same) != float(other)


def test_the_sampling_level_benchmark_changes_only_the_level_and_gives_the_stage_back(
        backend, monkeypatch, bench):
    outputs = []
    decode = backend.decode
    monkeypatch.setattr(backend, "decode", lambda x: outputs.append(x.clone()) or decode(x))
    own = backend.stages[SR_STAGE].noise_level
    rows = bench.measure(backend, samples=2, seed=1, levels=[0, 0, 200], steps=2)
    assert [(r["level"], r["source"], r["consistent"]) for r in rows] == [
        (0, "base", True), (0, "base", True), (200, "base", True), (own, "truth", False),
        (own, "truth", True)]
    assert set(rows[0]["accuracy"]) <= set(bench.COLUMNS) and 0 <= rows[0]["all_correct"] <= 1
    assert torch.equal(outputs[0], outputs[1])  # same base images, same noise
    assert not torch.equal(outputs[0], outputs[2])  # another level, another image
    assert backend.stages[SR_STAGE].noise_level == own and backend.stages[SR_STAGE].consistent
    assert "identity" not in rows[0] and 0 <= rows[-1]["identity"] <= 1
    assert rows[-1]["colour_shift"] < rows[-2]["colour_shift"]  # consistent: kept closer


def test_the_sampling_level_benchmark_fine_tunes_the_stage_per_scene_and_gives_it_back(
        backend, monkeypatch, bench):
    before = stage_weights(backend)
    tuned = []
    finetune = bench.finetune
    monkeypatch.setattr(bench, "finetune", lambda *a, **k: tuned.append(a[1].shape) or finetune(
        *a, **k))
    rows = bench.measure(backend, samples=3, seed=1, levels=[], steps=2, finetuned=2,
                         config=RECIPE)
    assert [(r["source"], r["consistent"]) for r in rows] == [
        ("truth", False), ("truth", True), ("truth, fine-tuned", False),
        ("truth, fine-tuned", True)]
    assert tuned == [(1, 3, 128, 128)] * 2  # each scene at the stage's resolution
    assert 0 <= rows[-1]["same_objects"] <= 1 and rows[-1]["colour_shift"] is not None
    after = stage_weights(backend)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_sampling_level_benchmark_reads_a_stage_that_gives_the_scene_back_as_kept(
        backend, monkeypatch, bench):
    """The truth row's identity, pebbles and same objects: a stage that returned the true scene
    keeps them all in every image, and moves no object's colour."""
    scenes = [scene for scene, _ in bench.evaluation_captions(3, 1)]
    truth = torch.cat([backend.encode_image(Image.fromarray(render(s)), SR_STAGE) for s in scenes])
    monkeypatch.setattr(backend, "upsample", lambda *args, **kwargs: truth)
    row = bench.measure(backend, samples=3, seed=1, levels=[], steps=2)[-1]
    assert (row["source"], row["all_correct"], row["identity"], row["pebbles"],
            row["same_objects"], row["colour_shift"]) == ("truth", 1.0, 1.0, 1.0, 1.0, 0.0)


def test_the_stage_start_benchmark_upsamples_the_same_base_images_from_noise_and_inversion(
        backend, monkeypatch):
    """benchmarks/shapes2_sr_start.py: per case and η, the stage reads the same base images
    twice, started from noise and from its inversion of the input, and nothing else differs."""
    start_bench = benchmark("shapes2_sr_start")
    upsample, calls = PixelCascadeBackend.upsample, []

    def spy(self, stage, low, *args, start=None, **kwargs):
        calls.append((low.clone(), start))
        return upsample(self, stage, low, *args, start=start, **kwargs)

    monkeypatch.setattr(PixelCascadeBackend, "upsample", spy)
    recipe = RECIPE.with_options(start="inversion", seeds=(0,))
    rows = start_bench.measure(backend, 1, [0.5, 1.0], config=recipe)
    assert [(r["case"], r["start"], r["eta"]) for r in rows] == [
        (0, "noise", 0.5), (0, "noise", 1.0), (0, "inversion", 0.5), (0, "inversion", 1.0)]
    (low_then, from_noise), (low_again, from_inversion) = calls
    assert torch.equal(low_then, low_again) and from_noise is None
    assert np.array_equal(np.asarray(from_inversion), np.asarray(start_bench.select_cases(1)[0]
                                                                 .image()))
    assert all(isinstance(r[k], bool) for r in rows for k in start_bench.VERDICTS)


def test_the_benchmarks_load_a_shapesworld2_cascade_and_refuse_another_model(run):
    """The shapes2 benchmark scripts' model check (`bench.shapes2.load_cascade`): a cascade with
    `sr128` loads; the single-stage ShapesWorld model is refused in one line."""
    from imagic.bench.shapes2 import load_cascade

    assert SR_STAGE in load_cascade(str(run / "model"), "cpu").stages
    with pytest.raises(InputError, match="has no sr128 stage: not a ShapesWorld 2 cascade"):
        load_cascade("imagic:shapes-32", "cpu")


def test_identity_benchmark_reads_each_object_that_stays_by_its_role(backend, monkeypatch):
    """benchmarks/shapes2_identity.py: each input object that stays is read at its place in
    every output, as the edited object or an untouched one, at every number of steps asked."""
    bench = benchmark("shapes2_identity")
    rows = bench.measure(backend, 1, [0.0], [2], config=RECIPE)  # the real stage 3, tiny model
    case = bench.select_cases(1)[0]  # a colour edit of one object
    assert [r["role"] for r in rows].count("edited") == 1
    assert len(rows) == len(case.source.things) and all(r["steps"] == 2 for r in rows)

    # η 0 renders the input exactly and every other η the target scene: every object is the
    # same and nothing moves, also where the edit moved the object (case 1)
    asked = []
    cases = bench.select_cases(2)

    def perfect(self, session, etas=None, seeds=None, **stage3):
        asked.append(stage3["sample_steps"])
        case = cases[(len(asked) - 1) // 2]  # one call per number of steps, case by case
        return [SimpleNamespace(image=Image.fromarray(render(case.source if eta == 0
                                                             else case.target)), eta=eta)
                for eta in etas]

    monkeypatch.setattr(bench.Imagic, "generate", perfect)
    rows = bench.measure(backend, 2, [0.0, 0.9], [3, 7], config=RECIPE)
    assert [c.kind for c in cases] == ["colour", "position"] and asked == [3, 7, 3, 7]
    assert len(rows) == 4 * sum(len(c.source.things) for c in cases)
    assert all(r["found"] and r["distance"] < 0.3 and r["marking_kept"] for r in rows)
    table = bench.table(rows)
    assert "| 7 | 0.9 | edited | 2 / 2 | 2 / 2 |" in table
    assert "| 3 | 0 | edited | 2 / 2 | 2 / 2 |" in table


def test_pose_benchmark_tells_a_colour_drift_from_a_changed_marking(backend, monkeypatch):
    """benchmarks/shapes2_pose.py: the pose cases are ShapesBench 2's (same indices); an output
    that reaches the pose exactly succeeds, one whose cat's hue moves loses it by colour, one
    whose cat's marking changes type loses it by marking, and the table counts each."""
    bench = benchmark("shapes2_pose")
    assert bench.pose_cases(2) == select_cases(8)[2::5]  # cases 2 and 7
    case = bench.pose_cases(1)[0]
    cat = next(t for t in case.target.things if t not in case.source.things)
    other = "spots" if cat.marking == "stripes" else "stripes"
    outputs = {0.0: case.source, 0.7: case.target,
               0.8: edit_thing(case.target, cat.position, hue_jitter=cat.hue_jitter + 6),
               0.9: edit_thing(case.target, cat.position, marking=other)}

    def drawn(self, session, etas=None, **stage3):
        return [SimpleNamespace(image=Image.fromarray(render(outputs[eta])), eta=eta)
                for eta in etas]

    monkeypatch.setattr(bench.Imagic, "generate", drawn)
    rows = bench.measure(backend, 1, [0.01, 0.02], list(outputs), config=RECIPE)
    assert [(r["embed_lr"], r["eta"]) for r in rows] == [
        (lr, eta) for lr in (0.01, 0.02) for eta in outputs]
    verdicts = {r["eta"]: (r["target"], r["identity"], r["success"], r["lost"])
                for r in rows if r["embed_lr"] == 0.01}
    assert verdicts == {0.0: (False, True, False, []), 0.7: (True, True, True, []),
                        0.8: (True, False, False, ["colour"]),
                        0.9: (True, False, False, ["marking"])}
    assert all(r["e_opt_moved"] > 0 for r in rows)
    cat_at = [t.position for t in case.target.things].index(cat.position)
    hue_moved, type_changed = (next(r["objects"][cat_at] for r in rows if r["eta"] == eta)
                               for eta in (0.8, 0.9))
    assert hue_moved["colour"] > 2 and hue_moved["marking"] == 0  # 6° over the 2° tolerance
    assert type_changed["marking"] >= 1
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + 2 * len(outputs) and lines[2].startswith("| 0.02 |")
    assert lines[-2].endswith("| 0.8 | 1 / 1 | 0 / 1 | 0 / 1 | 1 / 0 |")
    assert lines[-1].endswith("| 0.9 | 1 / 1 | 0 / 1 | 0 / 1 | 0 / 1 |")


def test_keep_average_moves_each_block_evenly_to_the_given_average():
    x, low = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)
    kept = keep_average(x, low)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(kept, 4), low)
    shift = (kept - x).unfold(2, 4, 4).unfold(3, 4, 4)  # N×C×4×4 blocks of 4×4
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))  # even in a block
    torch.testing.assert_close(keep_average(kept, low), kept)  # already kept: unchanged


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_correction_of_x0_changes_the_prediction_by_exactly_that(backend, monkeypatch,
                                                                    prediction_type):
    monkeypatch.setattr(backend, "prediction_type", prediction_type)
    x_t, prediction, t = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.tensor(600)
    torch.testing.assert_close(backend.corrected(prediction, x_t, t, lambda x0: x0), prediction)
    alpha = backend.noise_scheduler.alphas_cumprod[600]
    a, b = alpha.sqrt(), (1 - alpha).sqrt()

    def x0_of(pred):
        return (x_t - b * pred) / a if prediction_type == "epsilon" else a * x_t - b * pred

    moved = backend.corrected(prediction, x_t, t, lambda x0: x0 + 0.25)
    torch.testing.assert_close(x0_of(moved), x0_of(prediction) + 0.25)


def test_a_consistent_stage_gives_back_the_image_it_was_given_at_its_resolution(backend):
    """Its 128 px output, area-averaged to 32 px, is the 32 px image it read (it adds only
    finer detail); the same stage without it redraws that image."""
    assert backend.stages[SR_STAGE].consistent  # the world's cascades sample so
    low = torch.rand(2, 3, 32, 32) * 2 - 1
    e, uncond = backend.encode_text([TEXT, TEXT]), backend.encode_text([""])

    def upsampled():
        out = backend.upsample(SR_STAGE, low, e, uncond,
                               [torch.Generator().manual_seed(s) for s in (0, 1)], 3)
        return torch.nn.functional.avg_pool2d(out, 4)

    torch.testing.assert_close(upsampled(), low, atol=1e-4, rtol=0)
    backend.stages[SR_STAGE].consistent = False
    assert (upsampled() - low).abs().mean() > 0.1


@pytest.mark.parametrize("change, message", [
    ({"consistent": "yes"}, "must be true or false"),
    ({"consistent": True, "resolution": 120}, "multiple of the previous stage's 32"),
])
def test_a_stage_that_cannot_be_consistent_is_refused_at_load(run, tmp_path, change, message):
    folder = shutil.copytree(run / "model", tmp_path / "model")
    meta = json.loads((folder / "imagic_model.json").read_text())
    meta["stages"][SR_STAGE].update(change)
    (folder / "imagic_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=message):
        load_backend(str(folder), device="cpu")


def test_a_model_that_does_not_say_samples_its_stage_as_imagen_does(run, tmp_path):
    folder = shutil.copytree(run / "model", tmp_path / "model")
    meta = json.loads((folder / "imagic_model.json").read_text())
    del meta["stages"][SR_STAGE]["consistent"]
    (folder / "imagic_model.json").write_text(json.dumps(meta))
    loaded = load_backend(str(folder), device="cpu")
    assert not loaded.stages[SR_STAGE].consistent
    assert loaded.info()["stages"][SR_STAGE]["consistent"] is False


def test_the_base_trains_on_the_input_area_averaged_to_32_px(backend, photo):
    x0 = backend.encode_image(photo)
    assert x0.shape == (1, 3, 32, 32)
    full = backend.encode_image(photo, SR_STAGE)
    assert full.shape == (1, 3, 128, 128)
    torch.testing.assert_close(x0, resize(full, 32))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_edit_fine_tunes_both_stages_and_gives_every_weight_back(backend, photo, mode, tmp_path):
    before = stage_weights(backend)
    config = RECIPE if mode == "full" else RECIPE.with_options(finetune="lora")
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(photo, TEXT)
    assert set(session.losses) == {"stage1", "stage2", f"stage2_{SR_STAGE}"}
    assert len(session.losses[f"stage2_{SR_STAGE}"]) == RECIPE.aux_finetune_steps
    stages = {name.rpartition("/")[0] or "base" for name in session.delta.tensors}
    assert stages == {"base", SR_STAGE}  # the session holds every stage's delta
    assert session.input_image.size == (128, 128)
    images = editor.generate(session)
    after = stage_weights(backend)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # exactly the loaded model
    assert [im.image.size for im in images] == [(128, 128)] * 4
    # the session re-renders bit for bit from its folder
    session.save(tmp_path / "session")
    loaded = EditSession.load(tmp_path / "session")
    again = editor.generate(loaded)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(images, again))


def test_the_super_resolution_stage_trains_and_samples_on_e_tgt(backend, photo, monkeypatch):
    """The paper fine-tunes the super-resolution models on the input conditioned on the target
    text's embedding (§3.1), and they sample at it too; the base at e_opt, then ē."""
    editor = Imagic(backend, RECIPE, quiet=True)
    seen = {}
    loss_at = PixelCascadeBackend.loss_at

    def spy_loss(self, x0, cond, *drawn, stage="base", extra=()):
        seen.setdefault(stage, cond.hidden_states.detach().clone())
        return loss_at(self, x0, cond, *drawn, stage=stage, extra=extra)

    monkeypatch.setattr(PixelCascadeBackend, "loss_at", spy_loss)
    session = editor.fit(photo, TEXT)
    torch.testing.assert_close(seen[SR_STAGE], session.e_tgt.hidden_states, rtol=0, atol=0)
    upsample = PixelCascadeBackend.upsample
    conds = []

    def spy_upsample(self, stage, low, cond, *args, **kwargs):
        conds.append(cond.hidden_states.clone())
        return upsample(self, stage, low, cond, *args, **kwargs)

    monkeypatch.setattr(PixelCascadeBackend, "upsample", spy_upsample)
    editor.generate(session, etas=[0.0], seeds=[0])
    torch.testing.assert_close(conds[0], session.e_tgt.hidden_states, rtol=0, atol=0)


@pytest.mark.parametrize("start", ["noise", "inversion"])
def test_an_inversion_start_starts_the_super_resolution_stage_from_the_input(
        backend, photo, monkeypatch, start):
    """With start "inversion" the base starts from the input's inversion and so does every
    super-resolution stage, each from its own (the paper's start, noise, gives it none)."""
    editor = Imagic(backend, RECIPE, quiet=True)
    session = editor.fit(photo, TEXT)
    upsample, starts = PixelCascadeBackend.upsample, []

    def spy(self, *args, start=None, **kwargs):
        starts.append(start)
        return upsample(self, *args, start=start, **kwargs)

    monkeypatch.setattr(PixelCascadeBackend, "upsample", spy)
    editor.generate(session, etas=[0.5, 1.0], seeds=[0], start=start)
    assert starts == [session.input_image if start == "inversion" else None]


def test_a_stage_started_from_its_inversion_gives_the_input_back_where_nothing_changed():
    """Sampled beside the input's own 32 px image, the shipped stage started from its inversion
    of the input gives back the input's fine detail (its pebbles, markings, texture) far
    closer than one started from noise, which redraws it."""
    shipped = load_backend("imagic:shapes2-128", device="cpu")
    image = Image.fromarray(render(sample_scene(0)))
    x0, low = shipped.encode_image(image, SR_STAGE), shipped.encode_image(image)
    cond, uncond = shipped.encode_text([TEXT]), shipped.encode_text([""])

    def error(start):
        out = shipped.upsample(SR_STAGE, low, cond, uncond, [torch.Generator().manual_seed(0)],
                               10, start=start)
        return (out - x0).abs().flatten()

    inverted, redrawn = error(image), error(None)
    assert inverted.mean() < 0.6 * redrawn.mean()
    assert inverted.quantile(0.99) < 0.5 * redrawn.quantile(0.99)


def test_the_super_resolution_stage_fine_tunes_on_crops_that_read_only_their_own_pixels(
        backend):
    """With a crop side, ε is drawn at that side and the loss reads x0 only around its crop
    (a pixel far outside changes nothing; one inside does), so a crop costs a fraction of the
    whole image, as in training."""
    x0 = torch.rand(1, 3, 128, 128) * 2 - 1
    t, noise, level, low_noise, at = backend.draw(x0, torch.Generator().manual_seed(0), batch=2,
                                                  stage=SR_STAGE, crop=32)
    assert noise.shape == (2, 3, 32, 32) and low_noise.shape == (2, 3, 32, 32)
    at = torch.zeros(2, 2)  # both crops at the top left

    def loss(image):
        with torch.no_grad():
            return float(backend.loss_at(image, backend.encode_text([TEXT]), t, noise, level,
                                         low_noise, at, stage=SR_STAGE))

    far, near = x0.clone(), x0.clone()
    far[..., 64:, 64:] = -x0[..., 64:, 64:]
    near[..., 8:16, 8:16] = -x0[..., 8:16, 8:16]
    assert loss(far) == loss(x0) != loss(near)


@pytest.mark.parametrize("option, value, message", [
    ("aux_finetune_crop", 12, "aux_finetune_crop must be 0 .* multiple of 8 up to 128"),
    ("aux_finetune_crop", 136, "aux_finetune_crop must be 0 .* multiple of 8 up to 128"),
    ("aux_finetune_max_level", TINY.sr_max_noise_level + 1,
     f"aux_finetune_max_level must be from 0 to {TINY.sr_max_noise_level}"),
])
def test_a_crop_or_level_the_stage_cannot_train_on_is_refused_before_stage_1(
        backend, photo, option, value, message, monkeypatch):
    stage1 = []
    monkeypatch.setattr("imagic.editor.optimize_embedding", lambda *a, **k: stage1.append(a))
    config = RECIPE.with_options(**{option: value})
    with pytest.raises(InputError, match=message):
        Imagic(backend, config, quiet=True).fit(photo, TEXT)
    assert stage1 == []  # refused before any training


def test_an_edit_with_crops_fine_tunes_the_stage_at_its_own_k_and_levels_and_gives_it_back(
        backend, photo, monkeypatch):
    before = stage_weights(backend)
    draws = []
    draw = PixelCascadeBackend.draw

    def spy(self, x0, generator, batch=1, stage="base", **drawn):
        out = draw(self, x0, generator, batch, stage, **drawn)
        draws.append((stage, batch, drawn.get("crop", 0), int(out[2].max()) if drawn else None))
        return out

    monkeypatch.setattr(PixelCascadeBackend, "draw", spy)
    config = RECIPE.with_options(aux_finetune_crop=32, aux_timesteps_per_step=3,
                                 aux_finetune_max_level=2)
    session = Imagic(backend, config, quiet=True).fit(photo, TEXT)
    stage_draws = [d for d in draws if d[0] == SR_STAGE]
    assert len(stage_draws) == RECIPE.aux_finetune_steps
    assert all(batch == 3 and crop == 32 and level <= 2 for _, batch, crop, level in stage_draws)
    assert all(batch == RECIPE.timesteps_per_step for stage, batch, *_ in draws if stage == "base")
    assert any(k.startswith(f"{SR_STAGE}/") for k in session.delta.tensors)
    after = stage_weights(backend)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_one_k_asked_for_both_stages_reaches_the_super_resolution_stages_too():
    preset = EditConfig(aux_timesteps_per_step=8)
    assert preset.with_options(timesteps_per_step=2).aux_timesteps_per_step is None
    assert preset.with_options(finetune_timesteps_per_step=2).aux_timesteps_per_step is None
    assert preset.with_options(timesteps_per_step=2,
                               aux_timesteps_per_step=4).aux_timesteps_per_step == 4


def test_a_cascade_session_is_refused_by_a_model_without_its_stage(backend, photo, tmp_path):
    session = Imagic(backend, RECIPE, quiet=True).fit(photo, TEXT)
    session.save(tmp_path / "s")
    plain = PixelCascadeBackend(backend.unet, backend.text_encoder, backend.tokenizer,
                                backend.noise_scheduler.config, backend.identity, backend.device,
                                torch.float32, coord_channels=backend.coord_channels)
    with pytest.raises(SessionError, match=f"{SR_STAGE}/"):
        EditSession.load(tmp_path / "s").check_model(plain)


def test_world2_training_resumes_exactly(run, tmp_path):
    """Stopped after 2 steps and resumed to 4, the run equals the straight one: the same
    checkpoint tensors for all three models."""
    out = tmp_path / "resumed"
    CascadeTrainer(tiny_config(out, steps=2)).run()
    CascadeTrainer(tiny_config(out, resume=True)).run()
    for name in ("unet", SR_STAGE, "text_encoder", "ema"):
        straight = load_file(run / "checkpoint" / f"{name}.safetensors")
        resumed = load_file(out / "checkpoint" / f"{name}.safetensors")
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name


def test_world2_warm_start_copies_every_model(run, tmp_path):
    trainer = CascadeTrainer(tiny_config(tmp_path / "warm", init_from=str(run / "model")))
    exported = load_backend(str(run / "model"), device="cpu")
    for name, unet in exported.stage_unets().items():
        own = trainer.models["unet" if name == "base" else name].state_dict()
        assert all(torch.equal(own[k], v) for k, v in unet.state_dict().items())


def test_train_shapes_world_2_trains_the_cascade(monkeypatch):
    from imagic.cli import main
    from imagic.shapes import train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config: seen.setdefault("config", config))
    assert main(["train-shapes", "--world", "2", "--out", "x"]) == 0
    assert seen.pop("config").model == CascadeConfig()
    assert main(["train-shapes", "--out", "x"]) == 0
    assert not isinstance(seen.pop("config").model, CascadeConfig)


def test_a_frozen_base_keeps_its_weights_while_the_stage_trains_and_resumes_exactly(run, tmp_path):
    """--freeze unet,text_encoder: the exported base and text encoder are the --init-from ones
    bit for bit, sr128 learns, the base's loss is never computed, and a stopped run resumes to
    the straight one's checkpoint."""
    init = str(run / "model")
    frozen = ("unet", "text_encoder")
    straight = CascadeTrainer(tiny_config(tmp_path / "straight", init_from=init, freeze=frozen))
    calls = []  # the base runs only without gradients, for the sample grid
    straight.unet.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    straight.run()
    assert calls and not any(calls)
    start, after = load_backend(init, device="cpu"), load_backend(
        str(tmp_path / "straight" / "model"), device="cpu")
    for name in ("base", SR_STAGE):
        before = start.stage_unets()[name].state_dict()
        now = after.stage_unets()[name].state_dict()
        same = all(torch.equal(before[k], now[k]) for k in before)
        assert same == (name == "base"), name
    assert all(torch.equal(a, b) for a, b in zip(start.text_encoder.state_dict().values(),
                                                 after.text_encoder.state_dict().values()))
    meta = json.loads((tmp_path / "straight" / "model" / "imagic_model.json").read_text())
    assert meta["training"]["frozen"] == list(frozen)
    out = tmp_path / "resumed"
    CascadeTrainer(tiny_config(out, steps=2, init_from=init, freeze=frozen)).run()
    CascadeTrainer(tiny_config(out, resume=True, init_from=init, freeze=frozen)).run()
    for name in (SR_STAGE, "ema"):
        a = load_file(tmp_path / "straight" / "checkpoint" / f"{name}.safetensors")
        b = load_file(out / "checkpoint" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(InputError, match="--freeze"):  # the run was made with a freeze
        CascadeTrainer(tiny_config(out, resume=True, steps=6, init_from=init)).run()


@pytest.mark.parametrize("freeze, init, message", [
    (("unet",), False, "--init-from"),
    (("vae",), True, "some of unet, sr128, text_encoder"),
    (("unet", SR_STAGE, "text_encoder"), True, "not all"),
])
def test_freeze_refuses_what_it_cannot_hold(run, tmp_path, freeze, init, message):
    with pytest.raises(InputError, match=message):
        CascadeTrainer(tiny_config(tmp_path / "x", freeze=freeze,
                                   init_from=str(run / "model") if init else None))


def test_a_wider_base_starts_fresh_beside_the_exported_stage_and_text_encoder(run, tmp_path):
    """--base-channels with --fresh unet: the base has the new widths and its seed's weights,
    sr128 and the text encoder are the --init-from ones (here frozen) bit for bit, and the
    export loads as a cascade with the wider base and records what started fresh."""
    init, wider = str(run / "model"), dataclasses.replace(TINY, base_channels=(8, 16, 32))
    out = tmp_path / "wider"
    CascadeTrainer(tiny_config(out, model=wider, init_from=init, fresh=("unet",),
                               freeze=(SR_STAGE, "text_encoder"))).run()
    start, after = load_backend(init, device="cpu"), load_backend(str(out / "model"), device="cpu")
    assert list(after.stage_unets()["base"].config.block_out_channels) == [8, 16, 32]
    before = start.stage_unets()[SR_STAGE].state_dict()
    now = after.stage_unets()[SR_STAGE].state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(start.text_encoder.state_dict().values(),
                                                 after.text_encoder.state_dict().values()))
    meta = json.loads((out / "model" / "imagic_model.json").read_text())
    assert meta["training"]["fresh"] == ["unet"]
    assert meta["model_config"]["base_channels"] == [8, 16, 32]
    with pytest.raises(InputError, match="--fresh unet"):  # the base cannot be copied in
        CascadeTrainer(tiny_config(tmp_path / "x", model=wider, init_from=init))
    with pytest.raises(InputError, match="base_channels differ"):  # resumed without the widths
        CascadeTrainer(tiny_config(out, resume=True, steps=6, init_from=init, fresh=("unet",),
                                   freeze=(SR_STAGE, "text_encoder"))).run()


@pytest.mark.parametrize("fresh, freeze, init, message", [
    (("unet",), (), False, "--init-from"),
    (("unet",), ("unet",), True, "both name unet"),
    (("vae",), (), True, "--fresh takes some of unet, sr128, text_encoder"),
])
def test_fresh_refuses_what_it_cannot_start(run, tmp_path, fresh, freeze, init, message):
    with pytest.raises(InputError, match=message):
        CascadeTrainer(tiny_config(tmp_path / "x", fresh=fresh, freeze=freeze,
                                   init_from=str(run / "model") if init else None))


@pytest.mark.parametrize("widths, message", [
    ((32, 64), "give 3 widths"), ((32, 60, 96), "multiple of its 8 norm groups"),
    ((0, 64, 96), "positive multiple")])
def test_a_base_the_unet_cannot_have_is_refused(widths, message):
    with pytest.raises(InputError, match=message):
        CascadeConfig(base_channels=widths)


def test_train_shapes_passes_freeze(monkeypatch):
    from imagic.cli import main
    from imagic.shapes import train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config: seen.setdefault("config", config))
    assert main(["train-shapes", "--world", "2", "--out", "x", "--init-from", "m",
                 "--freeze", "unet, text_encoder"]) == 2  # m is no model folder
    assert main(["train-shapes", "--world", "2", "--out", "x", "--resume",
                 "--freeze", "unet, text_encoder"]) == 0
    assert seen.pop("config").freeze == ("unet", "text_encoder")
    assert main(["train-shapes", "--world", "2", "--out", "x", "--resume", "--fresh", "unet",
                 "--base-channels", "48,96,144"]) == 2  # --fresh needs --init-from
    init = str(Path(__file__).parents[1] / "src/imagic/assets/shapes2-128")
    assert main(["train-shapes", "--world", "2", "--out", "x", "--init-from", init, "--fresh",
                 "unet", "--freeze", "sr128,text_encoder", "--base-channels", "48,96,144"]) == 0
    config = seen.pop("config")
    assert (config.fresh, config.model.base_channels) == (("unet",), (48, 96, 144))
    assert main(["train-shapes", "--out", "x", "--base-channels", "48,96,144"]) == 2  # world 1
    assert main(["train-shapes", "--world", "2", "--out", "x", "--base-channels", "48,wide"]) == 2


def test_the_shipped_cascade_loads_by_name_and_draws_what_its_caption_asks():
    """`imagic:shapes2-128` ships in the package as safetensors (the package's models within
    40 MB in all), loads offline by the name sessions record, edits with the shapes2 preset, and
    samples a 128 px image that the detectors read as its caption."""
    from imagic.backends.cascade import ASSETS, EMBEDDED_MODELS
    from imagic.shapes2 import detect

    files = [f for f in ASSETS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40e6
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert set(EMBEDDED_MODELS) == {"imagic:shapes-32", "imagic:shapes2-128"}
    shipped = load_backend("imagic:shapes2-128", device="cpu")
    assert shipped.identity["source"] == "imagic:shapes2-128"
    assert shipped.default_preset == "shapes2" and shipped.output_resolution == 128
    assert shipped.stages[SR_STAGE].consistent
    cond, uncond = shipped.encode_text(["a large red circle in the middle"]), \
        shipped.encode_text([""])
    image = shipped.sample(cond, uncond, [torch.Generator().manual_seed(0)], 25, 1.0)[0]
    found = detect(np.asarray(image.convert("RGB")))
    assert [(t.kind, t.colour, t.size, t.position) for t in found.things] == [
        ("circle", "red", "large", "middle")]
