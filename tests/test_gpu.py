"""CUDA precision rules (skipped without a GPU): frozen parts in bf16, θ trained in fp32 under
autocast, and the base model restored exactly after an edit."""

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
    loss = backend.loss

    def spy(*args, **kwargs):
        seen.append({p.dtype for p in backend.unet.parameters()})
        return loss(*args, **kwargs)

    backend.loss = spy
    config = replace(EditConfig(), embed_steps=3, finetune_steps=2, sample_steps=3, etas=(1.0,),
                     embed_low_precision=True)
    session = Imagic(backend, config, quiet=True).fit(make_photo(), "a photo of a sitting dog")
    assert seen == [{torch.bfloat16}] * 3 + [{torch.float32}] * 2
    # under autocast only the norms' weights differ (rounded to bf16): the losses hardly move
    backend.loss = loss
    plain = Imagic(backend, replace(config, embed_low_precision=False), quiet=True).fit(
        make_photo(), "a photo of a sitting dog")
    torch.testing.assert_close(session.losses["stage1"], plain.losses["stage1"], rtol=1e-2,
                               atol=0)
    after = backend.unet.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, after[k]) for k, v in before.items())
