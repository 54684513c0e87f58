"""The three stages on a tiny Stable Diffusion: losses fall, the base model is never changed,
sessions round-trip, and every draw is reproducible."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_photo
from imagic import EditConfig, EditSession, Imagic, SessionError, load_backend
from imagic.editor import finetune, interpolate, optimize_embedding
from imagic.errors import InputError
from imagic.images import to_square

QUICK = EditConfig(embed_steps=30, embed_lr=5e-2, finetune_steps=30, finetune_lr=2e-3,
                   lora_lr=5e-2, timesteps_per_step=2, sample_steps=4, seeds=(0, 1),
                   etas=(0.0, 1.0))
TEXT = "a photo of a sitting dog"


def eval_loss(backend, x0, cond, draws=64, seed=123) -> float:
    """L(x0, e, θ) on a fixed set of (t, ε) draws, so two values are comparable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return backend.loss(x0, cond, g, batch=draws).item()


def state(backend):
    return {f"{m}.{k}": v.detach().clone() for m in ("unet", "vae", "text_encoder")
            for k, v in getattr(backend, m).state_dict().items()}


def unchanged(before, backend) -> bool:
    now = state(backend)
    return now.keys() == before.keys() and all(torch.equal(v, now[k]) for k, v in before.items())


def levels_apart(a, b) -> int:
    """The largest difference between two uint8 images, in levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def pixels(results):
    return [np.asarray(r.image) for r in results]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(str(tiny_model_dir))


@pytest.fixture(scope="module")
def x0(backend):
    return backend.encode_image(to_square(make_photo(), backend.resolution))


def test_stage1_lowers_the_loss_and_leaves_the_model_alone(backend, x0):
    before = state(backend)
    e_tgt = backend.encode_text([TEXT])
    e_opt, losses = optimize_embedding(backend, x0, e_tgt, QUICK, quiet=True)
    assert len(losses) == QUICK.embed_steps
    assert eval_loss(backend, x0, e_opt) < eval_loss(backend, x0, e_tgt)
    assert not torch.equal(e_opt.hidden_states, e_tgt.hidden_states)
    assert unchanged(before, backend)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage2_lowers_the_loss_then_restores_the_base_model(backend, x0, mode):
    before = state(backend)
    e = backend.encode_text([TEXT])
    config = replace(QUICK, finetune=mode)
    start = eval_loss(backend, x0, e)
    finetune(backend, x0, e, config, quiet=True)
    assert eval_loss(backend, x0, e) < start  # while θ' is in place
    delta = backend.take_delta()
    assert delta.kind == mode and delta.tensors
    if mode == "lora":
        assert all("lora" in name for name in delta.tensors)
    assert unchanged(before, backend)  # same values, and no adapter layers left behind
    assert eval_loss(backend, x0, e) == pytest.approx(start, abs=0)
    with backend.apply_delta(delta):
        assert eval_loss(backend, x0, e) < start
    assert unchanged(before, backend)


def test_interpolation_is_the_papers_formula(backend):
    e_tgt = backend.encode_text([TEXT])
    e_opt = e_tgt.map(lambda t: t + 1.0)
    for eta in (0.0, 0.3, 1.0, 1.5):
        expected = eta * e_tgt.hidden_states + (1 - eta) * e_opt.hidden_states
        torch.testing.assert_close(interpolate(e_tgt, e_opt, eta).hidden_states, expected)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fit_generate_and_session_round_trip(backend, tmp_path, mode):
    before = state(backend)
    editor = Imagic(backend, replace(QUICK, finetune=mode), quiet=True)
    session = editor.fit(make_photo(), TEXT)
    assert unchanged(before, backend)
    results = editor.generate(session)
    assert [(r.seed, r.eta) for r in results] == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]
    assert all(r.image.size == (64, 64) for r in results)
    images = pixels(results)
    assert not np.array_equal(images[0], images[1])  # η matters
    assert not np.array_equal(images[0], images[2])  # the seed matters
    # the fine-tuned weights matter: the base model at the same ē gives other pixels
    base_only = replace(session, delta=replace(session.delta, tensors={}))
    if mode == "full":
        assert not np.array_equal(pixels(editor.generate(base_only))[0], images[0])
    # save → load → generate reproduces the images exactly
    session.save(tmp_path / "session")
    loaded = EditSession.load(tmp_path / "session")
    assert loaded.delta.kind == mode
    assert loaded.config == session.config
    for a, b in zip(pixels(editor.generate(loaded)), images):
        np.testing.assert_array_equal(a, b)
    assert unchanged(before, backend)


def test_two_edits_in_one_process_match_fresh_processes(tiny_model_dir):
    """The second edit of a process gives the same pixels as that edit in a new process."""
    config = replace(QUICK, embed_steps=10, finetune_steps=10)
    shared = Imagic(load_backend(str(tiny_model_dir)), config, quiet=True)
    shared.generate(shared.fit(make_photo(seed=1), "a photo of a red cat"))
    second = pixels(shared.generate(shared.fit(make_photo(seed=2), TEXT)))
    fresh = Imagic(load_backend(str(tiny_model_dir)), config, quiet=True)
    for a, b in zip(pixels(fresh.generate(fresh.fit(make_photo(seed=2), TEXT))), second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_v_model_dir"])
def test_loss_target_follows_the_prediction_type(request, fixture):
    """ε-prediction models regress ε; v-prediction models regress v = √ᾱ·ε − √(1−ᾱ)·x0."""
    backend = load_backend(str(request.getfixturevalue(fixture)))
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    e = backend.encode_text([TEXT])
    loss = backend.loss(x0, e, torch.Generator().manual_seed(5), batch=3)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn((3, *x0.shape[1:]), generator=g)
    x0b = x0.expand(3, -1, -1, -1)
    alpha_bar = backend.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0b + (1 - alpha_bar).sqrt() * noise
    if backend.prediction_type == "epsilon":
        target = noise
    else:
        assert fixture == "tiny_v_model_dir"
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0b
    with torch.no_grad():
        pred = backend.unet(x_t, t, encoder_hidden_states=e.hidden_states.expand(3, -1, -1)).sample
    torch.testing.assert_close(loss, torch.mean((pred - target) ** 2), rtol=1e-4, atol=1e-6)


def test_v_prediction_edit_runs_end_to_end(tiny_v_model_dir):
    backend = load_backend(str(tiny_v_model_dir))
    assert backend.prediction_type == "v_prediction"
    editor = Imagic(backend, replace(QUICK, embed_steps=5, finetune_steps=5, seeds=(0,)),
                    quiet=True)
    results = editor.generate(editor.fit(make_photo(), TEXT))
    assert len(results) == 2


def test_same_seed_same_images_other_seed_other_images(backend):
    config = replace(QUICK, embed_steps=5, finetune_steps=5, seeds=(0,), etas=(0.7,))
    runs = [Imagic(backend, replace(config, seed=s), quiet=True) for s in (0, 0, 1)]
    sessions = [r.fit(make_photo(), TEXT) for r in runs]
    torch.testing.assert_close(sessions[0].e_opt.hidden_states, sessions[1].e_opt.hidden_states,
                               rtol=0, atol=0)
    assert not torch.equal(sessions[0].e_opt.hidden_states, sessions[2].e_opt.hidden_states)


def test_session_for_another_model_is_refused(backend, tiny_v_model_dir, tmp_path):
    editor = Imagic(backend, replace(QUICK, embed_steps=2, finetune_steps=2), quiet=True)
    editor.fit(make_photo(), TEXT).save(tmp_path / "s")
    other = Imagic(load_backend(str(tiny_v_model_dir)), quiet=True)
    with pytest.raises(SessionError, match="different one"):
        other.generate(EditSession.load(tmp_path / "s"))


def test_damaged_session_gives_one_line(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(SessionError, match="damaged"):
        EditSession.load(tmp_path / "s")
    with pytest.raises(SessionError, match="not an imagic session"):
        EditSession.load(tmp_path)


def test_a_session_keeps_its_losses_and_a_broken_manifest_is_one_error(backend, tmp_path):
    import json

    session = Imagic(backend, replace(QUICK, embed_steps=3, finetune_steps=4),
                     quiet=True).fit(make_photo(), TEXT)
    session.save(tmp_path / "s")
    loaded = EditSession.load(tmp_path / "s")
    assert [len(v) for v in loaded.losses.values()] == [3, 4]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for broken in ({k: v for k, v in manifest.items() if k != "delta"},
                   {**manifest, "config": {**manifest["config"], "etas": 5.0}}):
        (tmp_path / "s" / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(SessionError, match="damaged or incomplete"):
            EditSession.load(tmp_path / "s")


def test_a_session_is_never_saved_over_other_files(backend, tmp_path):
    session = Imagic(backend, replace(QUICK, embed_steps=1, finetune_steps=1),
                     quiet=True).fit(make_photo(), TEXT)
    out = tmp_path / "edit-out"  # an edit's output folder: a manifest.json, not a session's
    out.mkdir()
    (out / "manifest.json").write_text('{"text": "a dog", "images": []}')
    (out / "eta0.70_seed0.png").write_bytes(b"png")
    with pytest.raises(SessionError, match="not a session"):
        session.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["eta0.70_seed0.png", "manifest.json"]
    session.save(tmp_path / "s")
    session.save(tmp_path / "s")  # an earlier session is replaced


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_stage2_that_fails_part_way_gives_the_base_model_back(backend, mode, monkeypatch):
    before = state(backend)
    config = replace(QUICK, embed_steps=2, finetune_steps=5, finetune=mode)
    calls = []
    real = backend.loss_at

    def loss_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 + 3:  # stage 2's third step: out of memory, say
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "loss_at", loss_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)
    monkeypatch.setattr(backend, "loss_at", real)
    assert unchanged(before, backend)  # θ back, no adapter left behind
    Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)  # the next edit runs
    assert unchanged(before, backend)


def test_rendering_a_lora_session_leaves_the_callers_random_state_alone(backend):
    editor = Imagic(backend, replace(QUICK, embed_steps=1, finetune_steps=1, finetune="lora",
                                     seeds=(0,), etas=(1.0,)), quiet=True)
    session = editor.fit(make_photo(), TEXT)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    editor.generate(session)
    assert torch.equal(torch.rand(3), expected)


def test_the_python_api_reads_an_image_as_the_command_line_does(backend):
    from PIL import Image

    clear = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent: white, as the CLI
    with pytest.warns(UserWarning, match="transparency"):
        session = Imagic(backend, replace(QUICK, embed_steps=1, finetune_steps=1),
                         quiet=True).fit(clear, TEXT)
    assert np.asarray(session.input_image).min() == 255


def test_dpm_solver_sampler_is_reproducible_batch_invariant_and_not_ddim(backend):
    editor = Imagic(backend, replace(QUICK, embed_steps=2, finetune_steps=2), quiet=True)
    session = editor.fit(make_photo(), TEXT)
    dpm = pixels(editor.generate(session, etas=[0.0, 1.0], seeds=[0], sampler="dpm++"))
    again = pixels(editor.generate(session, etas=[1.0], seeds=[0], sampler="dpm++"))
    ddim = pixels(editor.generate(session, etas=[1.0], seeds=[0]))
    # same seed, alone or in a batch: the same image, up to the level or two that CPU kernels
    # may round differently at another batch size (README, "Hardware notes"; it shows with
    # one thread)
    assert levels_apart(dpm[1], again[0]) <= 2
    assert levels_apart(dpm[1], ddim[0]) > 2  # the session's default stays DDIM
    # a session saved with the sampler in its config renders with it
    dpm_session = replace(session, config=replace(session.config, sampler="dpm++"))
    dpm_again = pixels(editor.generate(dpm_session, etas=[1.0], seeds=[0]))[0]
    assert np.array_equal(dpm_again, again[0])  # the same call: bit for bit
    assert levels_apart(dpm_again, ddim[0]) > 2
    # SDEdit's partial schedule runs on it too
    cond, uncond = backend.encode_text([TEXT]), backend.encode_text([""])
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    out = backend.sample(cond, uncond, [torch.Generator().manual_seed(0)], 4, 7.5, x0=x0,
                         strength=0.5, sampler="dpm++")
    assert out[0].size == (backend.resolution, backend.resolution)


def test_inversion_start_ignores_the_seed_and_is_not_the_noise_start(backend):
    editor = Imagic(backend, replace(QUICK, embed_steps=2, finetune_steps=2), quiet=True)
    session = editor.fit(make_photo(), TEXT)
    inverted = [pixels(editor.generate(session, etas=[1.0], seeds=[s], start="inversion"))[0]
                for s in (0, 5)]
    assert np.array_equal(*inverted)  # the input's own x_T, whatever the seed
    noise = pixels(editor.generate(session, etas=[1.0], seeds=[0]))[0]
    assert levels_apart(inverted[0], noise) > 2
    with pytest.raises(InputError, match="one seed"):
        editor.generate(session, seeds=[0, 1], start="inversion")
    with pytest.raises(InputError, match="samples with ddim"):
        editor.generate(session, seeds=[0], start="inversion", sampler="dpm++")
    with pytest.raises(ValueError, match="not both"):
        backend.sample(session.e_tgt, session.e_tgt, [torch.Generator()], 2, 1.0,
                       x0=torch.zeros(1, 4, 8, 8), x_start=torch.zeros(1, 4, 8, 8))


def test_unknown_sampler_is_refused_in_one_line():
    with pytest.raises(InputError, match="sampler must be one of ddim, dpm\\+\\+"):
        replace(QUICK, sampler="euler")


def test_gradient_checkpointing_trains_the_same_weights_and_switches_off(backend, monkeypatch):
    config = replace(QUICK, embed_steps=2, finetune_steps=3, finetune="lora")
    plain = Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)
    seen = []  # whether checkpointing was on at each loss of stages 1-2
    loss_at = backend.loss_at

    def spy(*args, **kwargs):
        seen.append(backend.unet.is_gradient_checkpointing)
        return loss_at(*args, **kwargs)

    monkeypatch.setattr(backend, "loss_at", spy)
    saved = Imagic(backend, replace(config, gradient_checkpointing=True), quiet=True).fit(
        make_photo(), TEXT)
    monkeypatch.undo()
    assert seen == [True] * 5  # 2 steps of stage 1, 3 of stage 2
    assert not backend.unet.is_gradient_checkpointing  # off again once the stages are over
    np.testing.assert_allclose(saved.losses["stage1"], plain.losses["stage1"], rtol=1e-5)
    np.testing.assert_allclose(saved.losses["stage2"], plain.losses["stage2"], rtol=1e-4)
    for name, value in plain.delta.tensors.items():
        torch.testing.assert_close(saved.delta.tensors[name], value, rtol=1e-4, atol=1e-6)


def test_lora_edits_are_reproducible_from_the_seed(backend):
    config = replace(QUICK, embed_steps=2, finetune_steps=2, finetune="lora")
    first, second = (Imagic(backend, config, quiet=True).fit(make_photo(), TEXT) for _ in "ab")
    torch.manual_seed(1234)  # the global generator's state must not matter
    third = Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)
    for name, value in first.delta.tensors.items():
        assert torch.equal(second.delta.tensors[name], value)
        assert torch.equal(third.delta.tensors[name], value)


def test_optimize_returns_every_loss_in_order_whatever_the_step_count():
    """Losses are read back from the device in groups (training.READBACK_EVERY); every step's loss
    still comes back, in order, including a last partial group."""
    from imagic.training import READBACK_EVERY, optimize

    for steps in (0, 7, READBACK_EVERY, 23):
        w = torch.nn.Parameter(torch.tensor([3.0]))
        optimizer = torch.optim.SGD([w], lr=0.1)  # w ← w − 0.1·2w = 0.8·w, so loss_k = 9·0.64^k
        losses = optimize(lambda: (), lambda w=w: (w**2).sum(), optimizer, steps, "test",
                           quiet=True)
        assert losses == pytest.approx([9 * 0.64**k for k in range(steps)])
        assert all(isinstance(x, float) for x in losses)
