"""CUDA precision rules (skipped without a GPU): frozen parts in bf16, θ trained in fp32 under
autocast, and the base model restored exactly after an edit."""

import warnings
from dataclasses import replace

import pytest
import torch

from conftest import make_photo
from imagic import EditConfig, Imagic, load_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_edit_uses_bf16_frozen_parts_and_restores_fp32_weights(tiny_model_dir):
    backend = load_backend(str(tiny_model_dir), device="cuda")
    assert backend.text_encoder.dtype == torch.bfloat16 and backend.vae.dtype == torch.bfloat16
    assert backend.unet.dtype == torch.float32
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    config = replace(EditConfig(), embed_steps=3, finetune_steps=3, sample_steps=3, etas=(1.0,))
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(make_photo(), "a photo of a sitting dog")
    assert all(t.dtype == torch.float32 and t.device.type == "cpu"
               for t in session.delta.tensors.values())
    # the peak memory of every stage is recorded beside its seconds
    assert {"stage1_peak_gib", "stage2_peak_gib"} <= session.timings.keys()
    assert len(editor.generate(session)) == 1
    assert session.timings["generate_peak_gib"] > 0
    after = backend.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    # θ' in place exactly while sampling (copied through pinned memory), θ exactly after
    with backend.apply_delta(session.delta):
        params = dict(backend.unet.named_parameters())
        assert all(torch.equal(params[k].cpu(), v) for k, v in session.delta.tensors.items())
    after = backend.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_cuda_stage1_in_low_precision_holds_bf16_and_restores_fp32(tiny_model_dir):
    """`fast`'s stage 1: θ in bf16 on the GPU while e trains, the fp32 θ exactly back after."""
    backend = load_backend(str(tiny_model_dir), device="cuda")
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    seen = []
    loss_at = backend.loss_at

    def spy(*args, **kwargs):
        seen.append({p.dtype for p in backend.unet.parameters()})
        return loss_at(*args, **kwargs)

    backend.loss_at = spy
    config = replace(EditConfig(), embed_steps=3, finetune_steps=2, sample_steps=3, etas=(1.0,),
                     embed_low_precision=True)
    session = Imagic(backend, config, quiet=True).fit(make_photo(), "a photo of a sitting dog")
    assert seen == [{torch.bfloat16}] * 3 + [{torch.float32}] * 2
    # under autocast only the norms' weights differ (rounded to bf16): the losses hardly move
    backend.loss_at = loss_at
    plain = Imagic(backend, replace(config, embed_low_precision=False), quiet=True).fit(
        make_photo(), "a photo of a sitting dog")
    torch.testing.assert_close(session.losses["stage1"], plain.losses["stage1"], rtol=1e-2,
                               atol=0)
    after = backend.unet.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, after[k]) for k, v in before.items())


def _fit_counting_losses(backend, config):
    """fit() with `config`, counting the loss computations that ran from Python and keeping
    the warnings."""
    calls = []
    loss_at = backend.loss_at

    def counted(*args, **kwargs):
        calls.append(1)
        return loss_at(*args, **kwargs)

    backend.loss_at = counted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session = Imagic(backend, config, quiet=True).fit(make_photo(),
                                                             "a photo of a sitting dog")
    finally:
        backend.loss_at = loss_at
    return session, len(calls), [str(w.message) for w in caught]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_cuda_graphs_replay_the_steps_an_eager_run_takes(tiny_model_dir, finetune):
    """`cuda_graphs`: WARMUP_STEPS eager steps per stage, then one recorded step replayed for
    the rest, on the same draws: the losses and trained weights of the eager run, up to the
    kernels' rounding; θ exactly back after."""
    from imagic.training import WARMUP_STEPS

    backend = load_backend(str(tiny_model_dir), device="cuda")
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    config = replace(EditConfig(), embed_steps=9, finetune_steps=9, sample_steps=3, etas=(1.0,),
                     timesteps_per_step=2, finetune=finetune, embed_low_precision=True)
    eager, eager_calls, _ = _fit_counting_losses(backend, config)
    graphed, graphed_calls, caught = _fit_counting_losses(
        backend, replace(config, cuda_graphs=True))
    assert eager_calls == 9 + 9
    # per stage: the warm-up steps and the recording ran Python; the other steps were replays
    assert graphed_calls == 2 * (WARMUP_STEPS + 1)
    assert not [m for m in caught if "cannot be recorded as a CUDA graph" in m]
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(graphed.losses[stage], eager.losses[stage], rtol=1e-3,
                                   atol=1e-5)
    assert graphed.delta.tensors.keys() == eager.delta.tensors.keys()
    for name, value in eager.delta.tensors.items():
        torch.testing.assert_close(graphed.delta.tensors[name], value, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(graphed.e_opt.hidden_states, eager.e_opt.hidden_states,
                               rtol=1e-3, atol=1e-4)
    after = backend.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(tiny_model_dir):
    """A model part that reads a value back to the CPU cannot be recorded: the last warm-up
    step finds it (synchronising operations raise there), runs again normally, and the stage
    warns and goes on eagerly, training what the eager run trains. No recording is attempted,
    so PyTorch's streams and allocator are as before."""
    backend = load_backend(str(tiny_model_dir), device="cuda")
    config = replace(EditConfig(), embed_steps=6, finetune_steps=6, sample_steps=3, etas=(1.0,),
                     timesteps_per_step=2)
    eager, _, _ = _fit_counting_losses(backend, config)
    loss_at = backend.loss_at

    def reads_back(*args, **kwargs):
        loss = loss_at(*args, **kwargs)
        float(loss)  # a read-back: allowed eagerly, not in a recording
        return loss

    backend.loss_at = reads_back
    try:
        graphed, calls, caught = _fit_counting_losses(backend, replace(config, cuda_graphs=True))
    finally:
        backend.loss_at = loss_at
    assert calls == 6 + 1 + 6 + 1  # every step, plus each stage's checked step that raised
    assert sum("cannot be recorded as a CUDA graph" in m for m in caught) == 2
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(graphed.losses[stage], eager.losses[stage], rtol=1e-3,
                                   atol=1e-5)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()  # the allocator is not left mid-recording


def test_a_failed_recording_warns_and_no_later_stage_records(tiny_model_dir, monkeypatch):
    """If a recording itself fails (here: the loss raises only while being recorded), the stage
    warns and goes on eagerly on the default stream, and no later stage in the process records
    (after a real failure PyTorch's allocator may be left mid-recording)."""
    from imagic import training

    monkeypatch.setattr(training, "_recording_failed", False)
    backend = load_backend(str(tiny_model_dir), device="cuda")
    loss_at = backend.loss_at

    def fails_when_recorded(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("simulated: not recordable")
        return loss_at(*args, **kwargs)

    monkeypatch.setattr(backend, "loss_at", fails_when_recorded)
    config = replace(EditConfig(), embed_steps=6, finetune_steps=6, sample_steps=3, etas=(1.0,),
                     timesteps_per_step=2, cuda_graphs=True)
    session, calls, caught = _fit_counting_losses(backend, config)
    assert training._recording_failed
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert calls == (6 + 1) + 6  # stage 1: every step and the failed recording; stage 2: eager
    assert [m for m in caught if "cannot be recorded as a CUDA graph" in m] == [
        "stage 1/3 embedding: the training step cannot be recorded as a CUDA graph (simulated: "
        "not recordable); the stage goes on without it, slower"]
    assert len(session.losses["stage1"]) == 6 and len(session.losses["stage2"]) == 6
