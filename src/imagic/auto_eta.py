"""Automatic η: pick, per seed, one image of an η sweep, from signals every model has.

The paper leaves η to the user (the best η varies per image, usually 0.6–0.8 on its models).
Here the choice uses two signals and no outside judge:

1. Text alignment, with the base diffusion model θ as a text–image scorer (a "diffusion
   classifier", Li et al. 2023): for an output y, the denoising error
   D(y, e) = mean over K fixed (t, ε) of ‖ε − ε_θ(√ᾱ_t·y + √(1−ᾱ_t)·ε, t, e)‖².
   The margin m(y) = D(y, e_opt) − D(y, e_tgt) is positive when θ finds y easier to denoise as
   "the target text" than as "the input" (e_opt reconstructs the input). The same K draws serve
   every image and both embeddings, so their noise cancels in the comparisons.
2. Fidelity: d(y) = 1 − SSIM(y, input), a structural distance to the input.

Rule, per seed, over the sweep η_1 < … < η_n:

- alignment: let g_i = m_i − min_j m_j be the alignment each η gains, and G = max_i g_i; a is
  the smallest η with g_i ≥ FRACTION·G, the first η that reaches most of the alignment the
  sweep can reach;
- structure: b is the η at the largest step up of d along the sweep (max over i ≥ 2 of
  d_i − d_(i−1)), where the picture's structure changes most: where the edit is made;
- the pick is the later of the two, max(a, b).

Why both: the margin alone can peak one η before a shape has actually changed, while 1 − SSIM
jumps at the η where it does. Beyond the pick a larger η only costs fidelity. FRACTION is a
fixed constant, not tuned per model or benchmark.

With forget "auto" the sweep is rendered once per forgetting strategy, ordered from the one
that reverts the least of the session to the one that reverts the most (forgetting.candidates),
and the rule above picks an η per strategy. The margin is scored by the base model, so it
compares images across strategies, and its sign says whether θ reads an image as the target
text more than as the input: the pick is the first strategy whose picked image has m > 0
(the largest m when none has). Forgetting buys editability with the input's detail; this
forgets only when the edit is not made without it, and with one strategy it is the rule above.

docs/RESULTS.md ("Automatic η") compares the rule with the best fixed η and the best η per case
on ShapesBench.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .errors import ModelError

FRACTION = 0.75  # share of the sweep's alignment gain an η must reach to be a candidate
DRAWS = 32  # (t, ε) pairs per denoising-error estimate
AUTO_ETAS = tuple(round(0.1 * i, 1) for i in range(4, 13))  # 0.4 … 1.2: the sweep for --eta auto


@dataclass
class AutoChoice:
    seed: int
    eta: float  # the chosen η
    etas: list[float]  # the sweep
    margins: list[float]  # m(η): D(y, e_opt) − D(y, e_tgt) under the base model
    distances: list[float]  # d(η): 1 − SSIM(y, input)
    forget: str = "none"  # the forgetting strategy of the sweep (and of the pick)
    others: list[AutoChoice] = field(default_factory=list)  # forget "auto": the other sweeps

    def to_dict(self) -> dict:
        return {"seed": self.seed, "eta": self.eta, "forget": self.forget, "etas": self.etas,
                "margins": self.margins, "distances": self.distances,
                **({"others": [c.to_dict() for c in self.others]} if self.others else {})}

    @classmethod
    def from_dict(cls, data: dict) -> AutoChoice:
        """The inverse of to_dict (a manifest's "auto_eta" entry)."""
        others = [cls.from_dict(c) for c in data.get("others", [])]
        return cls(**{**data, "others": others})


def choose(etas: Sequence[float], margins: Sequence[float], distances: Sequence[float]) -> float:
    """The rule above, on numbers alone."""
    if not all(math.isfinite(x) for x in (*margins, *distances)):
        raise ModelError("auto-η: the model's denoising error is not finite (NaN or inf): the "
                         "weights or the precision are broken; pick η by hand with --eta")
    low = min(margins)
    gains = [m - low for m in margins]
    best = max(gains)
    aligned = min(eta for eta, g in zip(etas, gains) if g >= FRACTION * best)
    if len(etas) < 2:
        return aligned
    step = max(range(1, len(etas)), key=lambda i: distances[i] - distances[i - 1])
    return max(aligned, etas[step])


def choose_strategy(sweeps: Sequence[AutoChoice]) -> AutoChoice:
    """Among one seed's sweeps (one per forgetting strategy, least forgetting first, each with
    its η picked), the one the rule above picks, with the others attached."""
    margins = [c.margins[c.etas.index(c.eta)] for c in sweeps]
    made = [c for c, m in zip(sweeps, margins) if m > 0]
    chosen = made[0] if made else sweeps[margins.index(max(margins))]
    chosen.others = [c for c in sweeps if c is not chosen]
    return chosen


@torch.no_grad()
def denoising_error(backend, images: Sequence[Image.Image], cond, seed: int = 0,
                    draws: int = DRAWS) -> list[float]:
    """D(y, e) for each image under the backend's current weights (the same draws for all)."""
    errors = []
    for image in images:
        x0 = backend.encode_image(image)
        generator = torch.Generator("cpu").manual_seed(seed)
        errors.append(float(backend.loss(x0, cond, generator, batch=draws)))
    return errors


def structural_distance(images: Sequence[Image.Image], reference: Image.Image) -> list[float]:
    """1 − SSIM against the reference (torchmetrics; 7×7 Gaussian window, σ = 1)."""
    import numpy as np
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    def tensor(image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize(reference.size), dtype=np.float32)
        return torch.from_numpy(array / 255.0).permute(2, 0, 1)[None]

    ref = tensor(reference)
    return [1.0 - float(ssim(tensor(y), ref, data_range=1.0, kernel_size=7, sigma=1.0))
            for y in images]


def choose_etas(backend, session, results) -> dict[int, AutoChoice]:
    """Per seed of `results` (stage-3 outputs of `session`), the η the rule picks, and the
    forgetting strategy when `results` hold several (forget "auto").

    Scored with the base model (no fine-tuned delta applied): the margin asks θ, not θ′ that
    memorised the input, whether y reads as the target text.
    """
    session.check_model(backend)
    e_tgt = session.e_tgt.map(lambda t: t.to(backend.device))
    e_opt = session.e_opt.map(lambda t: t.to(backend.device))
    choices = {}
    for seed in dict.fromkeys(r.seed for r in results):
        sweeps = []
        for strategy in dict.fromkeys(r.forget for r in results if r.seed == seed):
            row = sorted((r for r in results if r.seed == seed and r.forget == strategy),
                         key=lambda r: r.eta)
            images = [r.image for r in row]
            d_opt = denoising_error(backend, images, e_opt)
            d_tgt = denoising_error(backend, images, e_tgt)
            margins = [a - b for a, b in zip(d_opt, d_tgt)]
            distances = structural_distance(images, session.input_image)
            etas = [r.eta for r in row]
            sweeps.append(AutoChoice(seed, choose(etas, margins, distances), etas, margins,
                                     distances, strategy))
        choices[seed] = choose_strategy(sweeps)
    return choices
