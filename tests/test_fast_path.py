"""The fast path: the `fast` preset keeps the paper's sample budget in K-timestep batches, each
stage uses its own K, and the GPU benchmark runs end to end (on the CPU, with --tiny)."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import make_photo
from imagic.cli import main
from imagic.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent


def test_fast_preset_keeps_the_papers_sample_budget_with_square_root_lr_scaling():
    paper, fast = get_preset("paper"), get_preset("fast")
    k1, k2 = fast.timesteps_per_step, fast.finetune_timesteps_per_step
    assert k1 > 1 and k2 > 1
    # samples (steps × K) within one batch of the paper's 1000 + 1500
    assert 0 <= fast.embed_steps * k1 - paper.embed_steps < k1
    assert 0 <= fast.finetune_steps * k2 - paper.finetune_steps < k2
    # Adam's square-root scaling rule: a K times larger batch takes lr × √K
    assert fast.embed_lr == pytest.approx(paper.embed_lr * k1**0.5)
    assert fast.finetune_lr == pytest.approx(paper.finetune_lr * k2**0.5)
    assert fast.lora_lr == pytest.approx(paper.lora_lr * k2**0.5)
    # stage 3 as in the paper
    assert (fast.etas, fast.guidance, fast.sample_steps, fast.sampler) == (
        paper.etas, paper.guidance, paper.sample_steps, paper.sampler)


def _spy_on_loss(monkeypatch):
    from imagic.backends.diffusers_unet import UNetBackend

    seen = []
    draw = UNetBackend.draw

    def spy(self, x0, generator, batch=1, stage="base"):
        seen.append(batch)
        return draw(self, x0, generator, batch=batch, stage=stage)

    monkeypatch.setattr(UNetBackend, "draw", spy)
    return seen


def test_each_stage_draws_its_own_k(tiny_model_dir, monkeypatch):
    from imagic.backends import load_backend
    from imagic.editor import Imagic

    backend = load_backend(str(tiny_model_dir), device="cpu")
    seen = _spy_on_loss(monkeypatch)
    config = replace(get_preset("fast"), embed_steps=2, finetune_steps=3, sample_steps=2,
                     etas=(1.0,))
    Imagic(backend, config, quiet=True).fit(make_photo(), "a photo of a dog")
    assert seen == [16, 16, 8, 8, 8]


def test_cli_timesteps_per_step_sets_both_stages(tmp_path, tiny_model_dir, photo_path,
                                                 monkeypatch):
    seen = _spy_on_loss(monkeypatch)
    args = ["edit", str(photo_path), "a photo of a dog", "--model", str(tiny_model_dir),
            "--preset", "fast", "--embed-steps", "1", "--finetune-steps", "1",
            "--sample-steps", "1", "--eta", "1", "--no-session", "--quiet"]
    assert main([*args, "--timesteps-per-step", "3", "--out", str(tmp_path / "a")]) == 0
    assert seen == [3, 3]
    seen.clear()
    assert main([*args, "--timesteps-per-step", "3", "--finetune-timesteps-per-step", "2",
                 "--out", str(tmp_path / "b")]) == 0
    assert seen == [3, 2]


def test_gpu_benchmark_runs_tiny_on_the_cpu_and_checks_its_own_report(tmp_path):
    """The benchmark ends with its report checked complete (exit 0), compares like with like
    (every variant does the fast preset's work), projects the reference from its two runs,
    flags a report that lacks a run, and refuses bad options before building a model."""
    spec = importlib.util.spec_from_file_location("gpu_edit", ROOT / "benchmarks" / "gpu_edit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    # 32 steps: over fewer, a tiny model's step is lost in a busy CPU's noise and the
    # benchmark rightly refuses to project from its timings
    assert bench.main(["--tiny", "--device", "cpu", "--reference-steps", "32",
                       "--fast-scale", "0.02", "--variants", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert bench.check_report(r, variants=["fast-eager", "fast+graphs", "lora+dpm++20"]) == []
    short, long = r["reference"]["measured"]
    per_step = (long["stage1_s"] - short["stage1_s"]) / (long["stage1_steps"]
                                                        - short["stage1_steps"])
    proj = r["reference"]["projected"]
    assert proj["stage1_s"] == pytest.approx(proj["stage1_s_fixed"] + 1000 * per_step, abs=0.02)
    steady = r["fast"]["steady"]
    assert steady["speedup"] == pytest.approx(proj["total_s"] / steady["total_s"], rel=0.01)
    for run in r["variants"].values():  # the same samples as `fast`; no graph on a CPU
        assert (run["stage1_samples"], run["stage2_samples"]) == (
            steady["stage1_samples"], steady["stage2_samples"])
        assert not run["cuda_graphs"]
    del r["fast"]["low_memory"]
    assert bench.check_report(r) == ["fast low_memory was not run"]
    for bad in (["--steady-runs", "0"], ["--variants", "fast+nope"], ["--memory-cap", "23.5"]):
        with pytest.raises(SystemExit) as exit_info:  # no CUDA device here for the cap
            bench.main(["--tiny", "--device", "cpu", *bad])
        assert exit_info.value.code == 2


def _fp32_unet(backend):
    return {k: v.detach().clone() for k, v in backend.unet.state_dict().items()}


def test_stage1_in_low_precision_holds_theta_in_bf16_and_gives_the_fp32_weights_back(
        tiny_model_dir, monkeypatch):
    """`fast` holds the frozen θ in bf16 during stage 1 on a GPU. The CPU stands in for CUDA
    here (bf16 weights, bf16 autocast): θ is bf16 at every loss, nearly the same embedding is
    learnt as with fp32 weights under the same autocast, and θ comes back bit for bit in fp32."""
    import torch

    from imagic import EditConfig, load_backend
    from imagic.editor import optimize_embedding
    from imagic.images import to_square

    backend = load_backend(str(tiny_model_dir))
    monkeypatch.setattr(backend, "frozen_dtype", torch.bfloat16)
    monkeypatch.setattr(backend, "_autocast", lambda cache_enabled=True: torch.autocast(
        "cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled))
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    e_tgt = backend.encode_text(["a photo of a sitting dog"])
    before = _fp32_unet(backend)
    dtypes = []
    loss_at = backend.loss_at

    def spy(*args, **kwargs):
        dtypes.append({p.dtype for p in backend.unet.parameters()})
        return loss_at(*args, **kwargs)

    monkeypatch.setattr(backend, "loss_at", spy)
    config = EditConfig(embed_steps=6, embed_lr=5e-2, timesteps_per_step=2)
    e_plain, plain = optimize_embedding(backend, x0, e_tgt, config, quiet=True)
    e_low, low = optimize_embedding(backend, x0, e_tgt,
                                    replace(config, embed_low_precision=True), quiet=True)
    assert dtypes == [{torch.float32}] * 6 + [{torch.bfloat16}] * 6
    after = _fp32_unet(backend)
    assert all(v.dtype == torch.float32 and torch.equal(v, after[k]) for k, v in before.items())
    # close, not equal: on the CPU a norm with bf16 weights also runs its backward in bf16 (on
    # CUDA autocast keeps norms in fp32, and only their weights are rounded). The losses agree
    # to bf16's precision (8 significant bits, a relative step of 2^-8).
    torch.testing.assert_close(low, plain, rtol=2**-8, atol=0)
    # Adam moves each value by about lr a step whatever its gradient's size, so where a
    # gradient is near 0 bf16 rounding can flip a step's sign on some CPUs: compare the
    # embedding as a whole, as far as it moved from e_tgt, not value by value.
    moved = (e_plain.hidden_states - e_tgt.hidden_states).norm()
    apart = (e_low.hidden_states - e_plain.hidden_states).norm()
    assert moved > 1 and apart < 0.1 * moved, (float(apart), float(moved))


def test_low_precision_gives_theta_back_after_an_error_and_is_a_no_op_in_float32(
        tiny_model_dir, monkeypatch):
    import torch

    from imagic import load_backend

    backend = load_backend(str(tiny_model_dir))
    before = _fp32_unet(backend)
    with backend.frozen_in_low_precision():  # the CPU computes in float32: nothing changes
        assert all(p.dtype == torch.float32 for p in backend.unet.parameters())
    monkeypatch.setattr(backend, "frozen_dtype", torch.bfloat16)
    with pytest.raises(RuntimeError, match="stop"), backend.frozen_in_low_precision():
        assert all(p.dtype == torch.bfloat16 for p in backend.unet.parameters())
        raise RuntimeError("stop")
    after = _fp32_unet(backend)
    assert all(torch.equal(v, after[k]) and after[k].dtype == torch.float32
               for k, v in before.items())


def test_a_restore_that_ran_out_of_memory_is_finished_by_the_next_call(tiny_model_dir,
                                                                       monkeypatch):
    """Stage 1 out of memory: its activations are still held while the context exits, so
    writing θ back in fp32 can run out too. θ must not stay rounded: the next use restores it."""
    import torch

    from imagic import load_backend
    from imagic.images import to_square

    backend = load_backend(str(tiny_model_dir))
    before = _fp32_unet(backend)
    monkeypatch.setattr(backend, "frozen_dtype", torch.bfloat16)
    empty, calls = torch.empty_like, []  # what the restore allocates each fp32 weight with

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return empty(*args, **kwargs)

    with pytest.raises(RuntimeError, match="stage 1 failed"), backend.frozen_in_low_precision():
        monkeypatch.setattr(torch, "empty_like", out_of_memory_once)
        raise RuntimeError("stage 1 failed")
    monkeypatch.setattr(torch, "empty_like", empty)
    assert torch.bfloat16 in {p.dtype for p in backend.unet.parameters()}  # still pending
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    loss = backend.loss(x0, backend.encode_text(["a dog"]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    after = _fp32_unet(backend)
    assert all(torch.equal(v, after[k]) and after[k].dtype == torch.float32
               for k, v in before.items())


def test_cuda_graphs_change_nothing_on_a_cpu_and_refuse_checkpointing(tiny_model_dir):
    """`cuda_graphs` records steps on a GPU only: on the CPU the edit is the same, step for step.
    Checkpointing is not recorded, so asking for both is one clear error, and --low-memory
    (which checkpoints) turns graphs off."""
    import torch

    from imagic import EditConfig, load_backend
    from imagic.editor import Imagic
    from imagic.errors import InputError
    from imagic.presets import low_memory
    from imagic.training import EagerStep, adam, make_step

    backend = load_backend(str(tiny_model_dir))
    config = replace(get_preset("fast"), embed_steps=2, finetune_steps=2, sample_steps=2,
                     etas=(1.0,))
    plain, graphed = (Imagic(backend, replace(config, cuda_graphs=on), quiet=True).fit(
        make_photo(), "a photo of a dog") for on in (False, True))
    assert graphed.losses == plain.losses
    assert all(torch.equal(graphed.delta.tensors[k], v) for k, v in plain.delta.tensors.items())
    w = torch.nn.Parameter(torch.ones(2))
    assert type(make_step(lambda: w.sum(), adam([w], 0.1, graphed=True), graphed=True)) \
        is EagerStep
    with pytest.raises(InputError, match="cuda_graphs does not record gradient checkpointing"):
        EditConfig(cuda_graphs=True, gradient_checkpointing=True)
    assert not low_memory(replace(config, cuda_graphs=True)).cuda_graphs


def test_fast_records_cuda_graphs_only_where_the_card_has_room(monkeypatch):
    """`fast` leaves cuda_graphs to the card (None): a recording reserved up to 37.7 GiB on an
    H100 and ran out of memory on a 24 GB card where eager steps fit, so graphs are recorded
    where ≥ 40 GiB can be used — the card's free memory, plus what PyTorch holds, within a
    per-process cap. True and False are obeyed on CUDA; a CPU and checkpointing never record."""
    import torch

    from imagic.presets import low_memory
    from imagic.training import uses_cuda_graphs

    GiB = 2**30
    card = {"free": 70 * GiB, "total": 80 * GiB, "reserved": 0, "fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (card["free"], card["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: card["reserved"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda device: card["fraction"], raising=False)
    fast = get_preset("fast")
    assert fast.cuda_graphs is None and get_preset("paper").cuda_graphs is False
    assert not uses_cuda_graphs(fast, "cpu")
    assert uses_cuda_graphs(fast, "cuda")  # an 80 GB card, 70 GiB free
    card.update(free=30 * GiB, reserved=12 * GiB)  # what this process already holds counts
    assert uses_cuda_graphs(fast, "cuda:0")
    card.update(free=22 * GiB, total=24 * GiB, reserved=0)  # a 24 GB card
    assert not uses_cuda_graphs(fast, "cuda")
    assert uses_cuda_graphs(replace(fast, cuda_graphs=True), "cuda")  # asked for: obeyed
    card.update(free=70 * GiB, total=80 * GiB, fraction=23.5 / 80)  # capped as a 24 GB card
    assert not uses_cuda_graphs(fast, "cuda")
    card.update(fraction=1.0)
    assert not uses_cuda_graphs(replace(fast, cuda_graphs=False), "cuda")
    assert not uses_cuda_graphs(low_memory(fast), "cuda")
    assert not uses_cuda_graphs(replace(fast, gradient_checkpointing=True), "cuda")


def test_the_loss_is_its_draws_then_the_loss_at_them(tiny_model_dir):
    """`loss` = `loss_at(draw())`: the engine draws (t, ε) apart from the loss so a CUDA graph
    can replay the loss with new draws; one seed gives the same draws and the same loss."""
    import torch

    from imagic import load_backend
    from imagic.images import to_square

    backend = load_backend(str(tiny_model_dir))
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    cond = backend.encode_text(["a dog"])
    t, noise = backend.draw(x0, torch.Generator().manual_seed(3), batch=4)
    assert t.shape == (4,) and noise.shape == (4, *x0.shape[1:])
    assert int(t.min()) >= 0 and int(t.max()) < backend.train_timesteps
    whole = backend.loss(x0, cond, torch.Generator().manual_seed(3), batch=4)
    assert torch.equal(whole, backend.loss_at(x0, cond, t, noise))


def test_gpu_benchmark_times_the_quick_preset_as_one_joint_stage(tmp_path):
    """`--fast-preset quick` (Forgedit's joint tuning) runs on the CPU's tiny model: its one
    stage is timed as stage 1, and neither the low-memory run nor the LoRA variant, which it
    has no form of, is asked for."""
    spec = importlib.util.spec_from_file_location("gpu_edit", ROOT / "benchmarks" / "gpu_edit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    assert bench.main(["--tiny", "--device", "cpu", "--reference-steps", "32", "--fast-preset",
                       "quick", "--fast-scale", "0.1", "--variants", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    steady = r["fast"]["steady"]
    assert (steady["tuning"], steady["stage1_steps"], steady["stage2_steps"]) == ("forgedit", 4, 0)
    assert "low_memory" not in r["fast"] and set(r["variants"]) == {"fast-eager", "fast+graphs"}
