"""AID's attention interpolation at stage 3 (`--interpolation attention`): the processor
computes the fused outer interpolation and leaves the other rows alone, the endpoints η = 0 and
1 are the linear ones, it runs for the warm-up steps only, and the UNet gets its own processors
back."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_photo
from imagic import EditConfig, Imagic, load_backend
from imagic.attention import OuterInterpolation, Plan, check_backend, interpolated_attention
from imagic.cli import main
from imagic.errors import InputError

TEXT = "a photo of a sitting dog"
QUICK = EditConfig(embed_steps=3, embed_lr=5e-2, finetune_steps=3, finetune_lr=2e-3,
                   sample_steps=4, seeds=(0, 1), etas=(0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(str(tiny_model_dir))


@pytest.fixture(scope="module")
def session(backend):
    return Imagic(backend, QUICK, quiet=True).fit(make_photo(), TEXT)


def plan_for(size: int, eta: float, active: bool = True) -> Plan:
    """Row 1 interpolates between rows 0 (e_opt) and 2 (e_tgt)."""
    return Plan(torch.tensor([1]), torch.tensor([0]), torch.tensor([2]), torch.tensor([eta]),
                size=size, warmup_steps=1, calls=1 if active else 0)


def attend(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_processor_is_the_fused_outer_interpolation(cross, guided):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    layer = Attention(8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4).eval()
    rows = 6 if guided else 3
    hidden = torch.randn(rows, 5, 8)
    context = torch.randn(rows, 7, 6) if cross else None
    eta = 0.3
    with torch.no_grad():
        plain = AttnProcessor2_0()(layer, hidden, context)
        got = OuterInterpolation(AttnProcessor2_0(), plan_for(3, eta))(layer, hidden, context)
        source = hidden if context is None else context

        def heads(x):
            return x.view(rows, -1, 2, 4).transpose(1, 2)

        q, k, v = heads(layer.to_q(hidden)), heads(layer.to_k(source)), heads(layer.to_v(source))
        i, b, e = (r + (3 if guided else 0) for r in (1, 0, 2))
        mixed = ((1 - eta) * attend(q[i], torch.cat([k[i], k[b]], 1), torch.cat([v[i], v[b]], 1))
                 + eta * attend(q[i], torch.cat([k[i], k[e]], 1), torch.cat([v[i], v[e]], 1)))
        expected = layer.to_out[0](mixed.transpose(0, 1).reshape(5, 8))
    torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)
    others = [r for r in range(rows) if r != i]  # the endpoints and the unconditional rows
    torch.testing.assert_close(got[others], plain[others], rtol=1e-5, atol=1e-6)
    # inactive (after the warm-up): the layer's own processor, bit for bit
    idle = OuterInterpolation(AttnProcessor2_0(), plan_for(3, eta, active=False))
    with torch.no_grad():
        assert torch.equal(idle(layer, hidden, context), plain)


def test_the_plan_refuses_a_batch_it_did_not_plan():
    with pytest.raises(RuntimeError, match="planned 3 rows"):
        plan_for(3, 0.5).offset(4)


def test_endpoints_are_the_linear_images_and_between_them_attention_changes_the_unet(
        backend, session):
    editor = Imagic(backend, session.config, quiet=True)
    linear = editor.generate(session)
    aid = editor.generate(session, interpolation="attention")
    assert [(r.seed, r.eta) for r in aid] == [(r.seed, r.eta) for r in linear]
    for a, b in zip(aid, linear):
        if a.eta in (0.0, 1.0):  # η = 0 is the e_opt branch and η = 1 the e_tgt one: the
            # linear images, up to rounding (their attention runs in the interpolating batch)
            diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert diff.max() <= 1, (a.seed, a.eta)
    # between them the η row's UNet output is no longer the linear one (rows 0, 2 unchanged)
    e_opt, e_tgt = session.e_opt, session.e_tgt
    conds = torch.cat([e_opt.hidden_states, e_opt.lerp(e_tgt, 0.5).hidden_states,
                       e_tgt.hidden_states])
    x = torch.randn(1, *backend.noise_shape()[1:], generator=torch.Generator().manual_seed(0))
    x = x.expand(3, -1, -1, -1)
    with torch.no_grad(), backend.apply_delta(session.delta):
        plain = backend.unet(x, 500, encoder_hidden_states=conds).sample
        plan = plan_for(3, 0.5, active=False)
        with interpolated_attention(backend.unet, plan):
            mixed = backend.unet(x, 500, encoder_hidden_states=conds).sample
    assert plan.calls == 1
    kept = (mixed[[0, 2]] - plain[[0, 2]]).abs().max()
    moved = (mixed[1] - plain[1]).abs().max()  # small: the tiny model's attention is weak
    assert kept <= 1e-6 and moved > 1e-5 and moved > 10 * kept


def test_attention_interpolates_for_the_warmup_steps_only_and_restores_the_processors(
        backend, session, monkeypatch):
    before = {name: type(p) for name, p in backend.unet.attn_processors.items()}
    calls = []
    original = OuterInterpolation.__call__

    def spy(self, *args, **kwargs):
        if self.plan.active:
            calls.append(self.plan.calls)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OuterInterpolation, "__call__", spy)
    editor = Imagic(backend, session.config, quiet=True)
    editor.generate(session, etas=[0.5], seeds=[0], interpolation="attention",
                    attention_warmup=0.5)
    assert set(calls) == {1, 2}  # 4 steps, half of them
    assert {name: type(p) for name, p in backend.unet.attn_processors.items()} == before


def test_denoisers_other_than_plain_unet_attention_are_refused(monkeypatch, backend):
    from test_deepfloyd_if import tiny_unet

    flux = SimpleNamespace(family="flux", unet=torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="flux's denoiser is not a diffusers UNet"):
        check_backend(flux)
    deepfloyd = SimpleNamespace(family="deepfloyd-if", unet=tiny_unet(super_resolution=False))
    with pytest.raises(InputError, match="added text keys and values"):
        check_backend(deepfloyd)  # IF's attention adds the text to the image's keys
    with pytest.raises(InputError, match="attention_warmup"):
        replace(QUICK, interpolation="attention", attention_warmup=0.0)
    # refused before any training
    import imagic.attention
    import imagic.training

    def refuse(_):
        raise InputError("refused")

    monkeypatch.setattr(imagic.attention, "check_backend", refuse)
    monkeypatch.setattr(imagic.training, "optimize", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(InputError, match="refused"):
        Imagic(backend, replace(QUICK, interpolation="attention"), quiet=True).fit(
            make_photo(), TEXT)


def test_cli_generate_with_attention_interpolation(tmp_path, tiny_model_dir, photo_path, capsys):
    session_dir = tmp_path / "s"
    assert main(["edit", str(photo_path), TEXT, "--model", str(tiny_model_dir), "--embed-steps",
                 "2", "--finetune-steps", "2", "--sample-steps", "2", "--eta", "1",
                 "--session", str(session_dir), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["generate", str(session_dir), "--interpolation", "attention", "--eta",
                 "0.5,0.8", "--attention-warmup", "1", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"]["interpolation"] == "attention"
    assert manifest["config"]["attention_warmup"] == 1.0
    assert len([f for f in manifest["images"]]) == 2
    capsys.readouterr()
    assert main(["generate", str(session_dir), "--interpolation", "attention",
                 "--attention-warmup", "1.5", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attention_warmup" in err
    assert not (tmp_path / "c").exists()


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
    from imagic.presets import get_preset

    paper = get_preset("paper")
    assert paper.with_options(interpolation="attention", attention_warmup=0.3).attention_warmup \
        == 0.3
    with pytest.raises(InputError, match="--attention-warmup is attention interpolation's"):
        paper.with_options(attention_warmup=0.3)
    with pytest.raises(InputError, match="--forget-strength says how far"):
        paper.with_options(forget_strength=0.5)
    # a benchmark's rows are per method and η: one forgetting strategy at a time
    assert main(["bench", "shapes", "--forget", "auto", "--out", str(tmp_path / "b")]) == 2
    assert "one forgetting strategy" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # imagic-auto-forget compares its picks with Imagic's rows, which must not forget
    assert main(["bench", "shapes", "--forget", "noencoder", "--methods",
                 "imagic,imagic-auto-forget", "--out", str(tmp_path / "c")]) == 2
    assert "drop --forget" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
