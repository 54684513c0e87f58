"""What the engine knows of a model: the Backend protocol and two small value types.

A backend wraps one model family (Stable Diffusion through diffusers, the embedded pixel-space
ShapesWorld model, ...). `editor.py` only ever talks to this protocol, so a new family is a new
file in this folder and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from PIL import Image


@dataclass
class TextCond:
    """A text conditioning e (paper: e_tgt, e_opt, ē).

    `hidden_states` is what every family has (SD: the CLIP last hidden state, B×77×768); `pooled`
    is for families that also take a pooled embedding (SDXL). Interpolation and optimization treat
    all the tensors alike, so the engine never needs to know which ones a family uses.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name, leaving out the ones this family doesn't have."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TextCond:
        return cls(**tensors)

    def map(self, fn) -> TextCond:
        """A new TextCond with `fn` applied to every tensor."""
        return TextCond.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def lerp(self, end: TextCond, weight: float) -> TextCond:
        """self + weight·(end − self), like `torch.lerp`.

        With self = e_opt and end = e_tgt this is the paper's ē = η·e_tgt + (1−η)·e_opt (eq. 3).
        """
        other = end.tensors()
        return TextCond.from_tensors(
            {k: torch.lerp(v, other[k].to(v.dtype), weight) for k, v in self.tensors().items()}
        )

    @staticmethod
    def cat(conds: Sequence[TextCond]) -> TextCond:
        """Stack conditionings along the batch dimension."""
        names = conds[0].tensors().keys()
        return TextCond.from_tensors({k: torch.cat([c.tensors()[k] for c in conds]) for k in names})


@dataclass
class Delta:
    """The weights that stage 2 trained, kept apart from the base model.

    kind "full": the trained values of every tensor that training changed (names as in the
    backend's `state_dict`). kind "lora": a peft LoRA adapter's weights and its rank.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_rank: int = 0

    def num_elements(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


class Backend(Protocol):
    """One model family, as the three stages of Imagic need it.

    Attributes a backend sets:
    - `resolution`: pixels of the square image the base model works at (stages 1 and 2);
    - `output_resolution`: pixels of the square images it makes and edits (a cascade's last
      super-resolution stage; `resolution` for every other family);
    - `prediction_type`: "epsilon" or "v_prediction";
    - `max_text_tokens`, `device`;
    - `train_timesteps`: the noise schedule's length, the most sampling steps there can be;
    - `default_preset`: the presets.py recipe for this family;
    - `auxiliary_stages`: names of a cascade's super-resolution stages, which stage 2 also
      fine-tunes, conditioned on e_tgt (empty for latent models);
    - `identity`: a dict that says which base model this is, saved in sessions and compared
      when a session is loaded.
    """

    resolution: int
    output_resolution: int
    prediction_type: str
    max_text_tokens: int
    train_timesteps: int
    device: torch.device
    auxiliary_stages: tuple[str, ...]
    default_preset: str
    identity: dict

    def count_text_tokens(self, text: str) -> int:
        """Tokens the encoder would see for `text` before truncation, start and end included."""

    def encode_text(self, texts: Sequence[str]) -> TextCond:
        """e for each text (paper: e_tgt), batched, on the device, no gradient."""

    def stage_resolution(self, stage: str) -> int:
        """Pixels of the square image `stage` ("base" or an auxiliary stage) works at."""

    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        """x0: the image in the model space of `stage` (SD: VAE latent mean × scaling factor;
        a cascade: the pixels at the stage's resolution)."""

    def loss(
        self,
        x0: torch.Tensor,
        cond: TextCond,
        generator: torch.Generator,
        batch: int = 1,
        stage: str = "base",
    ) -> torch.Tensor:
        """L(x0, e, θ) = E_t,ε ‖target − f_θ(x_t, t, e)‖² over `batch` draws of (t, ε):
        `loss_at(x0, cond, *draw(x0, generator, batch, stage), stage=stage)`."""

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, batch: int = 1, stage: str = "base",
        crop: int = 0, max_level: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`batch` draws (t, ε) for the loss, on the device: t uniform over the training
        timesteps, ε standard normal in x0's shape; a cascade's super-resolution stage adds the
        augmentation level (from 0 to `max_level`; None: the stage's training maximum) and noise
        of its conditioning image, and with a `crop` side ε at that side and where each crop
        lies (`check_aux_finetune` accepted both). Every draw comes from
        `generator` (a CPU generator), so a seed gives the same draws on any device."""

    def check_aux_finetune(self, stage: str, crop: int = 0, max_level: int | None = None) -> None:
        """A cascade's: refuse (InputError) what super-resolution stage `stage` cannot fine-tune
        with, `EditConfig`'s aux_finetune_crop (0: the whole image, always accepted) and
        aux_finetune_max_level (None: always accepted)."""

    def loss_at(
        self,
        x0: torch.Tensor,
        cond: TextCond,
        t: torch.Tensor,
        noise: torch.Tensor,
        *more: torch.Tensor,
        stage: str = "base",
    ) -> torch.Tensor:
        """The loss at given draws (`draw`'s tuple, in order): mean ‖target − f_θ(x_t, t, e)‖²,
        x_t = x0 noised by ε to t, target ε or v by `prediction_type`. Only device work, no
        host synchronisation, so the engine can record it in a CUDA graph and replay it with
        new draws copied into its inputs."""

    def trainable_parameters(
        self, mode: str, lora_rank: int = 4, stage: str = "base",
        only: Callable[[str], bool] | None = None,
    ) -> list[torch.nn.Parameter]:
        """Make θ of `stage` trainable (mode "full": all its weights, or those whose names
        `only` accepts; "lora": a new adapter) and return those parameters. The base weights
        are kept so `take_delta` can restore them."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the model's activations in the backward pass (less memory, more compute)."""

    def frozen_in_low_precision(self) -> AbstractContextManager[None]:
        """Within the `with` block θ is held in the backend's low precision (bf16 on CUDA) for a
        stage that does not train it (stage 1); after it, θ is exactly what it was. Where the
        backend computes in float32 (the CPU) it changes nothing."""

    def take_delta(self) -> Delta:
        """The trained weights as a Delta; the model is put back exactly as it was loaded."""

    def apply_delta(self, delta: Delta) -> AbstractContextManager[None]:
        """Within the `with` block the model has θ' (base + delta); after it, θ again."""

    def delta_shapes(self, kind: str, lora_rank: int = 0) -> dict[str, tuple[int, ...]]:
        """The name and shape of every tensor a Delta of `kind` may hold for this model, found
        without changing it: "full", θ's trainable tensors (a delta holds those that changed);
        "lora", the weights of a fresh adapter of rank `lora_rank` (a delta holds all of them).
        Sessions are checked against it before `apply_delta`, so nothing is ever broadcast."""

    def sample(
        self,
        conds: TextCond,
        uncond: TextCond,
        generators: Sequence[torch.Generator],
        steps: int,
        guidance: float,
        progress: bool = False,
        x0: torch.Tensor | None = None,
        strength: float = 1.0,
        sampler: str = "ddim",
        x_start: torch.Tensor | None = None,
        stage_conds: TextCond | None = None,
        stage_start: Image.Image | None = None,
    ) -> list[Image.Image]:
        """Stage 3: one image per row of `conds`, classifier-free guided against `uncond`; the
        initial noise of image i comes from `generators[i]` alone, so batching never changes it.
        `sampler` is one of SAMPLERS: "ddim" (the paper's) or "dpm++" (DPM-Solver++, 2nd order,
        about as good in 20 steps as DDIM in 50).

        With `x0` (the SDEdit baseline), start from x0 noised to `strength` of the way (1: pure
        noise) and run that last part of the schedule. With `x_start` (from `invert`), every
        image starts there instead of from the generators' noise. A cascade then runs its
        super-resolution stages conditioned on `stage_conds` (the paper: e_tgt; None: `conds`),
        from more noise drawn from the same generators, or with `stage_start` (the input image)
        each from its own DDIM inversion of it; other families ignore both."""

    def sample_steps_fit(self, steps: int, sampler: str) -> bool:
        """Whether `sampler` can take `steps` steps on the model's noise schedule (every
        timestep it visits lies on the schedule)."""

    def invert(self, x0: torch.Tensor, cond: TextCond, steps: int) -> torch.Tensor:
        """x_T: x0 run up the noise schedule by DDIM inversion (deterministic, `steps` steps,
        conditioned on `cond` without guidance). DDIM sampling from x_T in the same steps with
        the same cond gives x0 back, up to the discretisation."""

