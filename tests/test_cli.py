"""The command line end to end on a tiny pipeline saved to disk, and every bad input: one line,
exit status 2, and nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagic.cli import main
from imagic.errors import ModelError

FAST = ["--embed-steps", "3", "--finetune-steps", "3", "--sample-steps", "3", "--quiet"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_reloads_the_sessions_model_as_it_was_loaded(tmp_path, tiny_model_dir,
                                                              photo_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["edit", str(photo_path), "a dog", "--model", str(tiny_model_dir), "--eta", "1",
                 "--out", str(out), *FAST]) == 0
    manifest = out / "session" / "manifest.json"
    session = json.loads(manifest.read_text())
    # as a single-file checkpoint's session records it (a hub model's: the snapshot's revision)
    session["model"] |= {"config": "/models/sd15-configs", "revision": "0123abc"}
    manifest.write_text(json.dumps(session))
    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs, model=model)
        raise ModelError("stop here")

    monkeypatch.setattr("imagic.backends.load_backend", fake_load)
    assert main(["generate", str(out / "session"), "--quiet"]) == 2
    assert seen["model"] == session["model"]["source"]
    assert (seen["config"], seen["revision"]) == ("/models/sd15-configs", "0123abc")
    assert main(["generate", str(out / "session"), "--revision", "main", "--quiet"]) == 2
    assert seen["revision"] == "main"  # what the user names wins


def test_edit_ends_with_each_stages_time_and_the_gpu_peak():
    from imagic.outputs import time_and_memory

    cpu = {"encode_s": 0.1, "stage1_s": 9.16, "stage2_s": 29.17, "generate_s": 3.89}
    assert time_and_memory(cpu) == "time: stage 1 9.2 s, stage 2 29.2 s, stage 3 3.9 s"
    gpu = {**cpu, "stage1_peak_gib": 23.45, "stage2_peak_gib": 21.18, "generate_peak_gib": 10.9}
    assert time_and_memory(gpu).endswith("; peak GPU memory 23.4 GiB")


def test_edit_writes_images_grid_manifest_and_session_then_generate_reproduces(
    capsys, tmp_path, tiny_model_dir, photo_path
):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, "a photo of a sitting dog", "--model",
                       tiny_model_dir, "--eta", "0.5:0.7:0.1", "--seeds", "0,1", "--out", out,
                       *FAST)
    assert code == 0, err
    names = {f"eta{e:.2f}_seed{s}.png" for e in (0.5, 0.6, 0.7) for s in (0, 1)}
    assert names <= {p.name for p in out.iterdir()}
    assert {"grid.png", "manifest.json", "session"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text"] == "a photo of a sitting dog"
    assert manifest["config"]["etas"] == [0.5, 0.6, 0.7] and manifest["config"]["seeds"] == [0, 1]
    assert len(manifest["images"]) == 6 and len(manifest["input_sha256"]) == 64
    assert manifest["model"]["family"] == "stable-diffusion"
    session = json.loads((out / "session" / "manifest.json").read_text())
    assert {"stage1_s", "stage2_s"} <= session["timings"].keys()
    assert session["versions"]["torch"] and session["model"]["fingerprint"]
    assert session["config"]["embed_steps"] == 3
    with Image.open(out / "grid.png") as grid:
        assert grid.width > grid.height  # 4 columns (input + 3 η) by 2 rows of seeds

    # the same request from the saved session gives the same pixels, bit for bit
    again = tmp_path / "again"
    code, _, err = run(capsys, "generate", out / "session", "--eta", "0.5,0.6,0.7", "--seeds",
                       "0,1", "--out", again, "--quiet")
    assert code == 0, err
    for name in names:
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)),
                                      np.asarray(Image.open(again / name)))
    # without --out, a re-render goes to a new folder beside the session, never over the edit
    for n in (1, 2):
        assert main(["generate", str(out / "session"), "--eta", "0.6", "--seeds", "1",
                     "--quiet"]) == 0
        render = json.loads((out / f"session-render-{n}" / "manifest.json").read_text())
        assert render["command"] == "generate" and len(render["images"]) == 1
        assert render["timings"] and all(k.startswith("generate_") for k in render["timings"])
    assert json.loads((out / "manifest.json").read_text())["command"] == "edit"
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 6
    code, _, err = run(capsys, "generate", out / "session", "--out", out / "session")
    assert code == 2 and "session" in err
    # one image alone is sampled in a smaller batch: CPU kernels may round differently, by at
    # most a level or two of 255, never more
    alone = tmp_path / "alone"
    assert main(["generate", str(out / "session"), "--eta", "0.6", "--seeds", "1", "--out",
                 str(alone), "--quiet"]) == 0
    a = np.asarray(Image.open(out / "eta0.60_seed1.png")).astype(int)
    b = np.asarray(Image.open(alone / "eta0.60_seed1.png")).astype(int)
    assert np.abs(a - b).max() <= 2
    # other sampling settings: the manifest says what was used
    other = tmp_path / "other"
    assert main(["generate", str(out / "session"), "--eta", "0.6", "--sampler", "dpm++",
                 "--sample-steps", "2", "--guidance", "3", "--out", str(other), "--quiet"]) == 0
    config = json.loads((other / "manifest.json").read_text())["config"]
    assert (config["sampler"], config["sample_steps"], config["guidance"]) == ("dpm++", 2, 3.0)
    # from the input's inversion: one image per η, the session's first seed unless told
    inverted = tmp_path / "inverted"
    assert main(["generate", str(out / "session"), "--eta", "0.5,0.6", "--start", "inversion",
                 "--out", str(inverted), "--quiet"]) == 0
    manifest = json.loads((inverted / "manifest.json").read_text())
    assert manifest["config"]["start"] == "inversion" and manifest["config"]["seeds"] == [0]
    assert [i["file"] for i in manifest["images"]] == ["eta0.50_seed0.png", "eta0.60_seed0.png"]
    code, _, err = run(capsys, "generate", out / "session", "--start", "inversion", "--seeds",
                       "0,1", "--out", tmp_path / "refused")
    assert code == 2 and "one seed" in err and not (tmp_path / "refused").exists()


def test_edit_with_lora_pad_and_dpm_solver(capsys, tmp_path, tiny_model_dir, photo_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, "a red cat", "--model", tiny_model_dir,
                       "--finetune", "lora", "--lora-rank", "2", "--pad", "--eta", "1",
                       "--sampler", "dpm++", "--cuda-graphs", "on", "--out", out, "--session",
                       tmp_path / "s", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["delta"]["kind"] == "lora"
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["sampler"] == "dpm++"
    assert config["cuda_graphs"] is True  # asked for; a CPU runs the same steps eagerly
    assert (out / "eta1.00_seed0.png").exists()


def test_the_shapes_preset_starts_from_the_inversion_and_start_noise_takes_seeds(
        capsys, tmp_path, tiny_model_dir, photo_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, "a red cat", "--model", tiny_model_dir,
                       "--preset", "shapes", "--eta", "0.8,1", "--out", out, "--no-session",
                       *FAST)
    assert code == 0, err
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["start"] == "inversion" and config["seeds"] == [0]
    assert sorted(p.name for p in out.glob("eta*.png")) == ["eta0.80_seed0.png",
                                                            "eta1.00_seed0.png"]
    # several seeds need the paper's fresh noise: refused in one line that says how
    code, _, err = run(capsys, "edit", photo_path, "a red cat", "--model", tiny_model_dir,
                       "--preset", "shapes", "--seeds", "0,1", "--out", tmp_path / "no")
    assert code == 2 and "--start noise" in err and not (tmp_path / "no").exists()
    noise = tmp_path / "noise"
    assert main(["edit", str(photo_path), "a red cat", "--model", str(tiny_model_dir),
                 "--preset", "shapes", "--start", "noise", "--seeds", "0,1", "--eta", "1",
                 "--out", str(noise), "--no-session", *FAST]) == 0
    assert json.loads((noise / "manifest.json").read_text())["config"]["seeds"] == [0, 1]


def test_low_memory_trains_a_lora_adapter_with_checkpointing(capsys, tmp_path, tiny_model_dir,
                                                              photo_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit", photo_path, "a red cat", "--model", tiny_model_dir,
                       "--low-memory", "--eta", "1", "--out", out, *FAST)
    assert code == 0, err
    assert json.loads((out / "session" / "manifest.json").read_text())["delta"]["kind"] == "lora"
    assert json.loads((out / "manifest.json").read_text())["config"]["gradient_checkpointing"]


def test_info_reports_resolution_prediction_and_parameters(capsys, tiny_model_dir,
                                                          tiny_v_model_dir):
    code, out, _ = run(capsys, "info", tiny_model_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["resolution"] == 64 and info["prediction_type"] == "epsilon"
    assert info["parameters"]["unet"] > 0 and info["parameters"]["vae"] > 0
    code, out, _ = run(capsys, "info", tiny_v_model_dir)
    assert code == 0 and "v_prediction" in out and "resolution" in out


def test_long_text_warns_that_it_is_cut(capsys, tmp_path, tiny_model_dir, photo_path):
    code, _, err = run(capsys, "edit", photo_path, "a photo of the dog " * 8, "--model",
                       tiny_model_dir, "--eta", "1", "--out", tmp_path / "o", "--no-session",
                       *FAST)
    assert code == 0
    assert "warning" in err and "cut" in err


def one_line_error(capsys, *args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]


@pytest.fixture
def bad_inputs(tmp_path, photo_path, tiny_model_dir):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (40, 40)).save(tiny)
    anim = tmp_path / "anim.gif"
    Image.new("RGB", (80, 80)).save(anim, save_all=True,
                                    append_images=[Image.new("RGB", (80, 80), (9, 9, 9))])
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (80, 80)).save(cmyk)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04")
    single = tmp_path / "model.safetensors"
    save_file({"not.a.stable.diffusion.key": torch.zeros(2)}, single)
    return dict(photo=photo_path, text=text, tiny=tiny, anim=anim, cmyk=cmyk, file=a_file,
                model=tiny_model_dir, pickled=pickled, missing=tmp_path / "missing.png",
                single=single)


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", "{missing}", "a dog", "--model", "{model}"], "not found"),
        (["edit", "{text}", "a dog", "--model", "{model}"], "not an image"),
        (["edit", "{anim}", "a dog", "--model", "{model}"], "animated"),
        (["edit", "{cmyk}", "a dog", "--model", "{model}"], "CMYK"),
        (["edit", "{tiny}", "a dog", "--model", "{model}"], "at least 64"),
        (["edit", "{photo}", "   ", "--model", "{model}"], "empty"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--eta", "2.5"], "[-1, 2]"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--eta", "x"], "η must be"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--seeds", "1.5"], "integers"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--out", "{file}"], "is a file"),
        (["edit", "{photo}", "a dog", "--model", "{pickled}"], "--allow-pickle"),
        (["edit", "{photo}", "a dog", "--model", "./no/such/model"], "not found"),
        (["edit", "{photo}", "a dog", "--model", "{single}"], "--config DIR"),
        (["edit", "{photo}", "a dog", "--model", "someone/not-cached-model"], "hub"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--preset", "nope"], "unknown preset"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--embed-steps", "-1"], "embed_steps"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--low-memory", "--finetune", "full"],
         "drop --finetune full"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--device", "cpu", "--dtype",
          "bfloat16"], "needs a CUDA GPU"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--out", "{file}/sub"],
         "cannot be made"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--session", "{file}"], "is a file"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--out", "o", "--session", "o"],
         "same folder"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--session", "s", "--no-session"],
         "contradict"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--device", "mps"], "not supported"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--device", "tpu"], "unknown device"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--lora-rank", "8"], "--finetune lora"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--low-memory", "--finetune-lr",
          "1e-6"], "--lora-lr"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--low-memory", "--cuda-graphs",
          "on"], "cuda_graphs does not record gradient checkpointing"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--cuda-graphs", "yes"],
         "invalid choice"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--eta", "-0.5,0.5"],
         "--eta=-0.5,0.5"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--sample-steps", "2000"],
         "timesteps"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--start", "inversion",
          "--sampler", "dpm++"], "samples with ddim"),
        (["edit", "{photo}", "a dog", "--model", "{model}", "--start", "inversion",
          "--seeds", "0,1"], "one seed"),
        (["generate", "{file}", "--eta", "0.5"], "not an imagic session"),
        (["info", "{pickled}"], "pickled"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, bad_inputs, args,
                                                         message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(**bad_inputs) for a in args]
    before = sorted(tmp_path.rglob("*"))
    one_line_error(capsys, *args, message=message)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no folder made


def test_running_out_of_gpu_memory_is_one_line_with_what_to_try(capsys, monkeypatch):
    """An out-of-memory error from the model's work ends the command with one line naming
    the options that need less memory (exit 1: the input was fine, the card too small)."""
    import imagic.cli.edit

    def edit_on_a_small_card(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 MiB.\nmore")

    monkeypatch.setattr(imagic.cli.edit, "cmd_edit", edit_on_a_small_card)
    code, _, err = run(capsys, "edit", "photo.png", "a dog")
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("imagic: error: the GPU ran out of memory (CUDA out of memory. Tried")
    assert "--low-memory" in err and "--cuda-graphs off" in err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "imagic.cli", "edit", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "example:" in result.stdout and "--finetune" in result.stdout
