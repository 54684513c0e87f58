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
    loss = UNetBackend.loss

    def spy(self, x0, cond, generator, batch=1, stage="base"):
        seen.append(batch)
        return loss(self, x0, cond, generator, batch=batch, stage=stage)

    monkeypatch.setattr(UNetBackend, "loss", spy)
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


def test_gpu_benchmark_runs_tiny_on_the_cpu_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_edit", ROOT / "benchmarks" / "gpu_edit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--tiny", "--device", "cpu", "--reference-steps", "2",
                       "--fast-scale", "0.02", "--variants", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    short, long = r["reference"]["measured"]
    assert (short["stage1_steps"], long["stage1_steps"], long["images"]) == (2, 4, 8)
    proj = r["reference"]["projected"]
    per_step = (long["stage1_s"] - short["stage1_s"]) / 2
    assert proj["stage1_s"] == pytest.approx(proj["stage1_s_fixed"] + 1000 * per_step, abs=0.02)
    for run in (r["fast"]["cold"], r["fast"]["steady"], r["fast"]["low_memory"]):
        assert run["stage1_samples"] == run["stage1_steps"] * 16
        assert run["stage2_samples"] == run["stage2_steps"] * 8
        assert run["images"] == 8 and run["total_s"] > 0
    assert r["speedup_steady"] == pytest.approx(
        r["reference"]["projected"]["total_s"] / r["fast"]["steady"]["total_s"], rel=0.01)
    assert r["shape"] == "tiny" and "torch" in r["versions"]
    k16 = r["variants"]["lora-k16-dpm++20"]
    assert k16["finetune"] == "lora" and not k16["gradient_checkpointing"]
    assert k16["stage2_samples"] == k16["stage2_steps"] * 16  # the same budget in K = 16 steps
