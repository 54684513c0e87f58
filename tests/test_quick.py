"""The `quick` preset, Forgedit's joint tuning, on a tiny Stable Diffusion: one stage learns e
and the UNet's inner down and up blocks together, lowers the loss, trains nothing else, gives
the base model back, and runs end to end through the CLI."""

from dataclasses import replace

import torch

from conftest import make_photo
from imagic import Imagic, get_preset, load_backend
from imagic.cli import main
from imagic.editor import forgedit_blocks
from imagic.errors import InputError
from imagic.images import to_square

TEXT = "a photo of a sitting dog"


def test_joint_tuning_trains_e_and_the_inner_blocks_only(tiny_model_dir):
    backend = load_backend(str(tiny_model_dir))
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    config = replace(get_preset("quick"), finetune_steps=30, timesteps_per_step=4,
                     embed_lr=5e-2, finetune_lr=2e-3, sample_steps=2, etas=(1.0,))
    x0 = backend.encode_image(to_square(make_photo(), backend.resolution))
    e_tgt = backend.encode_text([TEXT])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        start = backend.loss(x0, e_tgt, g, batch=64).item()
    session = Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)
    assert session.delta.kind == "full" and session.delta.tensors
    assert all(forgedit_blocks(name) for name in session.delta.tensors)
    assert not torch.equal(session.e_opt.hidden_states, session.e_tgt.hidden_states)
    assert set(session.losses) == {"stage1"} and len(session.losses["stage1"]) == 30
    assert all(torch.equal(v, before[k]) for k, v in backend.unet.state_dict().items())
    with backend.apply_delta(session.delta), torch.no_grad():
        g = torch.Generator().manual_seed(7)
        end = backend.loss(x0, session.e_opt.map(lambda t: t.to(backend.device)), g,
                           batch=64).item()
    assert end < start


def test_quick_runs_through_the_cli_and_refuses_a_lora_stage(tmp_path, tiny_model_dir,
                                                            photo_path, capsys):
    args = ["edit", str(photo_path), TEXT, "--model", str(tiny_model_dir), "--preset", "quick",
            "--finetune-steps", "2", "--timesteps-per-step", "2", "--sample-steps", "2",
            "--eta", "0.7,1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "grid.png").is_file()
    assert main([*args, "--low-memory", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forgedit" in err and not (tmp_path / "b").exists()
    try:
        get_preset("quick").with_options(finetune="lora")
    except InputError as error:
        assert "not a LoRA adapter" in str(error)
    else:
        raise AssertionError("a LoRA joint stage was accepted")
