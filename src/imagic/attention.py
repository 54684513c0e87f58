"""Attention interpolation (He et al., "AID: Attention Interpolation of Text-to-Image Diffusion",
NeurIPS 2024) as stage 3's way of mixing e_opt and e_tgt (`--interpolation attention`).

The paper's stage 3 samples one UNet at ē = η·e_tgt + (1−η)·e_opt. With AID, the image at η is
sampled beside its two endpoint branches from the same noise: the image at e_opt (η = 0, the
input) and the image at e_tgt (η = 1, the text), all under θ'. In every attention layer of the
base UNet, self- and cross-attention alike, the η image attends with its own query to its own
keys and values fused with one endpoint's, and the two results are mixed ("fused outer
interpolation", AID's default):

    out = (1 − η)·Attn(q, [k, k_opt], [v, v_opt]) + η·Attn(q, [k, k_tgt], [v, v_tgt])

k_opt, v_opt come from the e_opt branch at the same layer and step (its image's features in
self-attention, its text in cross-attention), k, v from the η image itself, whose text is the
linear ē. This holds for the first `attention_warmup` fraction of the sampling steps (AID's
code: 0.5; at least one step); after them every branch samples as usual. The unconditional
half of classifier-free guidance attends as usual throughout, as in AID's code
(QY-H00/attention-interpolation-diffusion).

Cost: the two branches are sampled once per seed and sampling call, and η = 0 and 1 are the
branches themselves; n other η values of one seed take n + 2 rows of the UNet's batch instead
of n (calls of at most sample_batch rows, `batches`), and during the warm-up each of their rows
runs two attentions over twice the keys. η outside [0, 1] extrapolates the two attentions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends.base import TextCond
from .errors import InputError


@dataclass
class Plan:
    """Which rows of the UNet's conditional batch interpolate, with what, and for how long.

    `rows`, `begin`, `end` and `coef` are parallel: row rows[i] mixes its attention to the
    e_opt branch at row begin[i] and the e_tgt branch at row end[i] by coef[i] (η). `size` is
    the number of conditional rows; a guided call puts as many unconditional rows first."""

    rows: torch.Tensor
    begin: torch.Tensor
    end: torch.Tensor
    coef: torch.Tensor
    size: int
    warmup_steps: int
    calls: int = 0  # UNet calls so far: one per sampling step

    @property
    def active(self) -> bool:
        return 0 < self.calls <= self.warmup_steps

    def count_call(self, module, args) -> None:
        """A forward pre-hook on the base UNet: one call per sampling step."""
        self.calls += 1

    def offset(self, batch: int) -> int:
        """Where the conditional rows start in a batch of `batch` rows."""
        if batch == self.size:
            return 0
        if batch == 2 * self.size:  # classifier-free guidance: unconditional rows first
            return self.size
        raise RuntimeError(f"attention interpolation planned {self.size} rows, the UNet got "
                           f"{batch}")


class OuterInterpolation:
    """A diffusers attention processor: the layer's own processor, or while the plan is
    active, AID's fused outer interpolation for the rows the plan names."""

    def __init__(self, original, plan: Plan):
        self.original = original
        self.plan = plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        plan = self.plan
        if not plan.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, **kwargs)
        if attention_mask is not None:
            raise InputError("attention interpolation does not handle masked attention")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        def heads(x: torch.Tensor) -> torch.Tensor:  # B×L×(H·d) -> B×H×L×d
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), \
            heads(attn.to_v(context))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = attn.scale
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        shift = plan.offset(query.shape[0])  # the plan's tensors live on the model's device
        rows, begin, end = plan.rows + shift, plan.begin + shift, plan.end + shift
        q, k, v = query[rows], key[rows], value[rows]
        to_opt = F.scaled_dot_product_attention(
            q, torch.cat([k, key[begin]], dim=2), torch.cat([v, value[begin]], dim=2),
            scale=scale)
        to_tgt = F.scaled_dot_product_attention(
            q, torch.cat([k, key[end]], dim=2), torch.cat([v, value[end]], dim=2), scale=scale)
        coef = plan.coef.to(query.dtype).view(-1, 1, 1, 1)
        out[rows] = (1 - coef) * to_opt + coef * to_tgt
        hidden_states = out.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def check_backend(backend) -> None:
    """AID replaces the plain attention processors of a UNet (Stable Diffusion 1/2, SDXL, the
    embedded models); a transformer's joint attention and IF's added-KV attention differ."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = getattr(backend, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise InputError(f"attention interpolation runs on a UNet's attention layers; "
                         f"{backend.family}'s denoiser is not a diffusers UNet: use "
                         "--interpolation linear or vp")
    if not all(isinstance(p, (AttnProcessor, AttnProcessor2_0))
               for p in unet.attn_processors.values()):
        raise InputError(f"attention interpolation runs on plain attention layers; "
                         f"{backend.family}'s UNet has others (added text keys and values): "
                         "use --interpolation linear or vp")


@contextmanager
def interpolated_attention(unet, plan: Plan) -> Iterator[None]:
    """Within the block, `unet`'s attention layers interpolate as `plan` says."""
    processors = unet.attn_processors
    unet.set_attn_processor({name: OuterInterpolation(p, plan) for name, p in processors.items()})
    hook = unet.register_forward_pre_hook(plan.count_call)
    try:
        yield
    finally:
        plan.warmup_steps = 0  # inactive at once, even if what follows is interrupted
        hook.remove()
        unet.set_attn_processor(processors)


def batches(jobs: Sequence[tuple[int, float]], sample_batch: int) -> list[list]:
    """`jobs` ((seed, η) pairs) in sampling calls of at most `sample_batch` rows, the e_opt and
    e_tgt rows of each seed included: one seed per call, at least one η per call."""
    chunks = []
    for seed in dict.fromkeys(seed for seed, _ in jobs):
        mine = [job for job in jobs if job[0] == seed]
        size = max(1, sample_batch - 2)
        chunks += [mine[i : i + size] for i in range(0, len(mine), size)]
    return chunks


def sample(backend, jobs: Sequence[tuple[int, float]], e_tgt: TextCond, e_opt: TextCond,
           uncond: TextCond, config, x_start=None, stage_start=None) -> list:
    """Stage 3 with attention interpolation for `jobs` ((seed, η) pairs): one image per job.

    Every seed of `jobs` gets two rows, its e_opt and e_tgt branches, started from the same
    noise (the seed's generator); a job at η = 0 or 1 is its branch's image, the others get a
    row each. A cascade's super-resolution stages upscale every row, branches included."""
    conds, seeds, branches = [], [], {}
    for seed in dict.fromkeys(seed for seed, _ in jobs):  # each seed's e_opt and e_tgt rows
        branches[seed] = len(conds)
        conds += [e_opt, e_tgt]
        seeds += [seed, seed]
    picked, rows, begin, end, coef = [], [], [], [], []
    for seed, eta in jobs:
        if eta in (0, 1):
            picked.append(branches[seed] + int(eta))
            continue
        picked.append(len(conds))
        rows.append(len(conds))
        begin.append(branches[seed])
        end.append(branches[seed] + 1)
        coef.append(eta)
        conds.append(e_opt.lerp(e_tgt, eta))  # the η image's own text: AID's linear start
        seeds.append(seed)
    device = backend.device
    plan = Plan(torch.tensor(rows, device=device), torch.tensor(begin, device=device),
                torch.tensor(end, device=device),
                torch.tensor(coef, dtype=torch.float32, device=device), size=len(conds),
                warmup_steps=max(1, int(config.sample_steps * config.attention_warmup)))
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with interpolated_attention(backend.unet, plan) if rows else nullcontext():
        images = backend.sample(
            TextCond.cat(conds), uncond, generators, config.sample_steps, config.guidance,
            sampler=config.sampler, x_start=x_start,
            stage_conds=TextCond.cat([e_tgt] * len(conds)),  # super-resolution: e_tgt
            stage_start=stage_start,
        )
    return [images[i] for i in picked]
