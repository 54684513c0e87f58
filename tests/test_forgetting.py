"""Forgedit's forgetting and vector-projection interpolation at stage 3, on a tiny Stable
Diffusion: the named groups go back to the base weights and nothing else does, the base model is
untouched afterwards, a session re-renders with another strategy without training, and vp's
η = 0 is the input's embedding."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_photo
from imagic import EditConfig, Imagic, load_backend
from imagic.backends.base import TextCond
from imagic.cli import main
from imagic.editor import vector_projection
from imagic.errors import InputError
from imagic.forgetting import STRATEGIES, forget

QUICK = EditConfig(embed_steps=3, embed_lr=5e-2, finetune_steps=3, finetune_lr=2e-3,
                   lora_lr=5e-2, sample_steps=3, seeds=(0,), etas=(1.0,))
TEXT = "a photo of a sitting dog"


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(str(tiny_model_dir))


@pytest.fixture(scope="module", params=["full", "lora"])
def session(request, backend):
    config = replace(QUICK, finetune=request.param)
    return Imagic(backend, config, quiet=True).fit(make_photo(), TEXT)


def unet_values(backend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.unet.named_parameters()}


def lora_module(name: str) -> str:
    return name.split(".lora_")[0]


@pytest.mark.parametrize("strategy", ["decoderkv", "encoderkv", "noencoder"])
def test_forgetting_reverts_exactly_the_named_groups(backend, session, strategy):
    reverts = STRATEGIES[strategy]
    base = unet_values(backend)
    if session.delta.kind == "lora":  # the reverted layers' updates B·A are zero, no other
        forgotten = forget(backend, session.delta, strategy).tensors
        assert forgotten.keys() == session.delta.tensors.keys()
        assert any(reverts(lora_module(k)) for k in forgotten)
        assert any(not reverts(lora_module(k)) for k in forgotten)
        for name, value in forgotten.items():
            zero = reverts(lora_module(name)) and ".lora_B." in name
            expected = torch.zeros_like(value) if zero else session.delta.tensors[name]
            assert torch.equal(value, expected), name
        with backend.apply_delta(forget(backend, session.delta, strategy)):
            pass
        assert all(torch.equal(v, base[k]) for k, v in unet_values(backend).items())
        return
    with backend.apply_delta(session.delta):
        tuned = unet_values(backend)
    with backend.apply_delta(forget(backend, session.delta, strategy)):
        forgotten = unet_values(backend)
    assert unet_values(backend).keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in unet_values(backend).items())  # untouched
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert any(reverts(k) for k in changed) and any(not reverts(k) for k in changed)
    for name in base:
        expected = base[name] if reverts(name) else tuned[name]
        assert torch.equal(forgotten[name], expected), name


def test_a_strategy_that_reverts_nothing_trained_says_so(backend, session):
    """A LoRA adapter adapts attention layers only, all of which "decoderattn" keeps."""
    if session.delta.kind == "lora":
        with pytest.warns(UserWarning, match="decoderattn changes nothing"):
            assert forget(backend, session.delta, "decoderattn") is session.delta
    else:
        forgotten = forget(backend, session.delta, "decoderattn")
        assert set(forgotten.tensors) < set(session.delta.tensors)


def test_half_strength_goes_half_way_back(backend, session):
    """Full: the reverted tensors halfway between θ' and θ; LoRA: the adapter's update halved."""
    reverts = STRATEGIES["decoderkv"]
    if session.delta.kind == "lora":
        half = forget(backend, session.delta, "decoderkv", 0.5).tensors
        for name, value in half.items():
            scale = 0.5 if reverts(lora_module(name)) and ".lora_B." in name else 1.0
            assert torch.equal(value, session.delta.tensors[name] * scale), name
        return
    base = unet_values(backend)
    with backend.apply_delta(session.delta):
        tuned = unet_values(backend)
    with backend.apply_delta(forget(backend, session.delta, "decoderkv", 0.5)):
        half = unet_values(backend)
    for name in base:
        expected = (tuned[name] + base[name]) / 2 if reverts(name) else tuned[name]
        torch.testing.assert_close(half[name], expected, rtol=1e-5, atol=1e-6)


def test_a_session_re_renders_with_forgetting_and_no_training(backend, session, monkeypatch):
    import imagic.training

    editor = Imagic(backend, session.config, quiet=True)
    plain = np.asarray(editor.generate(session)[0].image)
    monkeypatch.setattr(imagic.training, "optimize", lambda *a, **k: pytest.fail("trained"))
    forgot = np.asarray(editor.generate(session, forget="noencoder")[0].image)
    assert not np.array_equal(plain, forgot)
    assert np.array_equal(np.asarray(editor.generate(session, forget="noencoder",
                                                     forget_strength=0.0)[0].image), plain)
    with pytest.raises(InputError, match="forget must be one of"):
        editor.generate(session, forget="everything")


def test_cli_generate_forgets_and_refuses_a_bad_strength(tmp_path, tiny_model_dir, photo_path,
                                                         capsys):
    session_dir = tmp_path / "s"
    assert main(["edit", str(photo_path), TEXT, "--model", str(tiny_model_dir), "--embed-steps",
                 "2", "--finetune-steps", "2", "--sample-steps", "2", "--eta", "1",
                 "--session", str(session_dir), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["generate", str(session_dir), "--forget", "decoderkv", "--interpolation", "vp",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert (tmp_path / "b" / "grid.png").is_file()
    capsys.readouterr()
    assert main(["generate", str(session_dir), "--forget", "decoderkv", "--forget-strength",
                 "2", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "forget_strength" in err
    assert not (tmp_path / "c").exists()


def test_a_transformer_has_nothing_to_forget():
    names = torch.nn.ModuleDict({"transformer_blocks": torch.nn.Linear(2, 2)})
    flow = SimpleNamespace(family="flux", stage_unets=lambda: {"base": names})
    delta = SimpleNamespace(kind="lora", tensors={}, lora_rank=4)
    with pytest.raises(InputError, match="flux's denoiser has neither"):
        forget(flow, delta, "decoderattn")
    assert forget(flow, delta, "none") is delta


def test_vector_projection_starts_at_e_opt_and_adds_only_the_orthogonal_part():
    g = torch.Generator().manual_seed(0)
    e_opt = TextCond(torch.randn(1, 5, 8, generator=g), torch.randn(1, 8, generator=g))
    e_tgt = TextCond(torch.randn(1, 5, 8, generator=g), torch.randn(1, 8, generator=g))
    at0 = vector_projection(e_tgt, e_opt, 0.0)
    for name, value in at0.tensors().items():
        assert torch.equal(value, e_opt.tensors()[name])
    at1 = vector_projection(e_tgt, e_opt, 1.2)
    for name, value in at1.tensors().items():
        added = value - e_opt.tensors()[name]
        along = (added * e_opt.tensors()[name]).sum(-1)
        torch.testing.assert_close(along, torch.zeros_like(along), atol=1e-5, rtol=0)
    # e_tgt along e_opt adds nothing: only what the text says beyond the input moves ē
    parallel = e_opt.map(lambda t: 3 * t)
    for name, value in vector_projection(parallel, e_opt, 1.0).tensors().items():
        torch.testing.assert_close(value, e_opt.tensors()[name])
