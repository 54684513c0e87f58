"""Pixel-space diffusion cascades (the Imagen family the paper's main results used): each UNet
works on the image itself, so x0 is the image in [−1, 1] and sampling needs no decoder.

A cascade is a base text-to-image model at a low resolution and super-resolution stages, each a
UNet that denoises the image at its own resolution given the previous stage's image (Imagen,
Saharia et al. 2022, §2.4): that image, upsampled and concatenated to x_t as extra channels, is
first noised to an augmentation level that the UNet also reads ("noise conditioning
augmentation"), so the stage learns to ignore the previous stage's artefacts. Every stage reads
the same text encoder. The engine fine-tunes each super-resolution stage on the input at its
resolution, conditioned on e_tgt, as the paper does (§3.1), and stage 3 samples the base at ē and
then every super-resolution stage at e_tgt. An edit that starts from the input's inversion
starts every stage from its own: the base's under e_opt, each super-resolution stage's under
e_tgt beside the input's own lower-resolution image, so each keeps the input's detail at its
scale wherever the edit leaves the image.

A stage marked "consistent" gives back the image it was given: at every sampling step its
predicted clean image is corrected so that, area-averaged to the previous stage's resolution, it
equals the previous stage's image (the range–null-space correction of DDNM, Wang et al. 2023,
for area-average downsampling). The stage then only adds detail finer than the previous
stage's pixels, and cannot redraw the colours it was given.

The embedded ShapesWorld model is a cascade of one stage (32×32). A model folder holds
`imagic_model.json` and diffusers/transformers component folders: `unet/`, `text_encoder/`,
`tokenizer/`, `scheduler/`, and one UNet folder per super-resolution stage, named after it
(e.g. `sr128/`) and described under "stages" in `imagic_model.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, ModelError
from ..images import to_pil, to_tensor
from .base import TextCond
from .diffusers_unet import UNetBackend, make_sampler, weights_fingerprint

MODEL_FILE = "imagic_model.json"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# the models shipped in the package, by the name sessions record (no path: it moves)
EMBEDDED_MODELS = {"imagic:shapes-32": ASSETS / "shapes-32",
                   "imagic:shapes2-128": ASSETS / "shapes2-128"}
EMBEDDED_SOURCE = "imagic:shapes-32"  # the default model: `--model` not given


@dataclass
class SuperResolution:
    """One super-resolution stage and how it samples (from `imagic_model.json`)."""

    unet: torch.nn.Module  # reads x_t and the previous image upsampled (no coordinates: a
    # stage is local, it can train on crops); its class label is the augmentation level
    # (diffusers' class_embed_type "timestep")
    resolution: int  # pixels of its square images
    noise_level: int  # the augmentation timestep its conditioning image gets when sampling
    max_noise_level: int  # training (and stage 2) draw the level uniformly from 0 to this
    sample_steps: int  # its sampler's steps (at most the base's)
    guidance: float  # its classifier-free guidance scale
    consistent: bool = False  # sampling keeps its output's area average the previous image


class PixelCascadeBackend(UNetBackend):
    """A pixel-space text-to-image UNet with a CLIP text encoder, and its super-resolution
    stages."""

    family = "pixel-cascade"
    default_preset = "shapes"  # presets.py: tuned for the embedded ShapesWorld model

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config, identity, device, dtype,
                 coord_channels: int = 0, stages: dict[str, SuperResolution] | None = None):
        super().__init__(unet, text_encoder, tokenizer, scheduler_config, identity, device, dtype)
        self.resolution = self.unet.config.sample_size
        self.coord_channels = coord_channels
        self.stages = dict(stages or {})
        for stage in self.stages.values():
            stage.unet.to(device, torch.float32)
            stage.unet.requires_grad_(False)
            stage.unet.eval()
        self.auxiliary_stages = tuple(self.stages)
        if self.stages:  # presets.py: the ShapesWorld 2 cascade's recipe
            self.default_preset = "shapes2"

    def stage_unets(self) -> dict[str, torch.nn.Module]:
        return {"base": self.unet, **{name: s.unet for name, s in self.stages.items()}}

    def stage_resolution(self, stage: str) -> int:
        self._stage_unet(stage)
        return self.resolution if stage == "base" else self.stages[stage].resolution

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        return add_coordinates(x) if self.coord_channels else x

    def encode_image(self, image: Image.Image, stage: str = "base") -> torch.Tensor:
        """x0 = the pixels in [−1, 1] at the stage's resolution (an input at the cascade's
        output resolution is area-averaged down to the base's, as training made its images)."""
        x = to_tensor(image).to(self.device)
        return resize(x, self.stage_resolution(stage))

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        return to_pil(x)

    # -- the super-resolution stages --------------------------------------------------------

    def _previous_resolution(self, stage: str) -> int:
        names = ["base", *self.stages]
        return self.stage_resolution(names[names.index(stage) - 1])

    def predict(self, stage, x_t, t, cond, extra=()):
        if stage == "base":
            return super().predict(stage, x_t, t, cond)
        low, level = extra  # the previous image, noised and upsampled; its noise level
        return self.stages[stage].unet(torch.cat([x_t, low], dim=1), t,
                                       encoder_hidden_states=cond.hidden_states,
                                       class_labels=level).sample

    def conditioning(self, stage: str, low: torch.Tensor, level: torch.Tensor,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `stage` reads of the previous image `low`: noised to timestep `level` by the
        model's schedule, then upsampled (bilinear) to the stage's resolution."""
        noised = self.noise_scheduler.add_noise(low, noise, level)
        return resize(noised, self.stage_resolution(stage)), level

    def crop_grid(self, stage: str) -> int:
        """The stride of a super-resolution stage's UNet: its crops start on this grid, so a
        crop sees the pixel grid the whole image does."""
        return 2 ** (len(self.stages[stage].unet.config.block_out_channels) - 1)

    def check_aux_finetune(self, stage: str, crop: int = 0, max_level: int | None = None) -> None:
        """Refuse a fine-tuning crop `stage` cannot train on (0: the whole image), or a highest
        augmentation level beyond the one it trained to."""
        grid, full = self.crop_grid(stage), self.stage_resolution(stage)
        if crop and (crop % grid or not 0 < crop <= full):
            raise InputError(f"aux_finetune_crop must be 0 (the whole image) or a multiple of "
                             f"{grid} up to {full} for {stage}, got {crop}")
        top = self.stages[stage].max_noise_level
        if max_level is not None and not 0 <= max_level <= top:
            raise InputError(f"aux_finetune_max_level must be from 0 to {top} (the highest "
                             f"{stage} trained at), got {max_level}")

    def draw(self, x0, generator, batch=1, stage="base", crop=0, max_level=None):
        """(t, ε), and for a super-resolution stage also the augmentation level (uniform from 0
        to `max_level`, None: to the stage's training maximum) and noise of its conditioning
        image, all from `generator`; with a `crop` side, ε is drawn at that side, and then where
        each sample's crop lies (fractions of the room along x and y)."""
        if stage == "base":
            return super().draw(x0, generator, batch)
        side = crop or x0.shape[-1]
        t, noise = super().draw(x0[..., :side, :side], generator, batch)
        level = self.draw_level(stage, batch, generator, max_level)
        low_side = self._previous_resolution(stage)
        low_noise = torch.randn((batch, x0.shape[1], low_side, low_side), generator=generator)
        drawn = (t, noise, self._upload(level), self._upload(low_noise))
        return (*drawn, torch.rand((batch, 2), generator=generator)) if crop else drawn

    def draw_level(self, stage: str, batch: int, generator: torch.Generator,
                   max_level: int | None = None) -> torch.Tensor:
        """`batch` augmentation levels of `stage`'s conditioning image, uniform from 0 to
        `max_level` (None: the stage's training maximum), on the CPU."""
        top = self.stages[stage].max_noise_level if max_level is None else max_level
        return torch.randint(0, top + 1, (batch,), generator=generator)

    def loss_at(self, x0, cond, t, noise, level=None, low_noise=None, at=None, stage="base",
                extra=()):
        """The loss of `stage`; a super-resolution stage reads x0 itself brought down to the
        previous stage's resolution (area average) as its conditioning image, and with `at`
        (a crop's place, from `draw`) trains on that crop of x0 and of its conditioning image,
        as Imagen's super-resolution stages train (they have no self-attention)."""
        if stage == "base":
            return super().loss_at(x0, cond, t, noise)
        x0 = x0.expand(t.shape[0], -1, -1, -1)
        upsampled, level = self.conditioning(stage, resize(x0, self._previous_resolution(stage)),
                                             level, low_noise)
        if at is not None:
            x0, upsampled = crop(at, noise.shape[-1], self.crop_grid(stage), x0, upsampled)
        return super().loss_at(x0, cond, t, noise, stage=stage, extra=(upsampled, level))

    @torch.no_grad()
    def sample(self, conds, uncond, generators, steps, guidance, progress=False, x0=None,
               strength=1.0, sampler="ddim", x_start=None, stage_conds=None, stage_start=None):
        """The base at `conds` (SDEdit and inversion starts apply to it), then every
        super-resolution stage at `stage_conds` (the paper: e_tgt; default `conds`), each from
        fresh noise drawn from the same per-image generators, or from its own inversion of
        the image `stage_start`."""
        x = self.sample_base(conds, uncond, generators, steps, guidance, progress, x0,
                             strength, sampler, x_start)
        for name in self.stages:
            x = self.upsample(name, x.clamp(-1, 1), stage_conds or conds, uncond, generators,
                              steps, sampler, progress, start=stage_start)
        return self.decode(x)

    @torch.no_grad()
    def upsample(self, stage: str, low: torch.Tensor, conds: TextCond, uncond: TextCond,
                 generators, steps: int, sampler: str = "ddim", progress: bool = False,
                 start: Image.Image | None = None) -> torch.Tensor:
        """One super-resolution stage: `low` (the previous stage's images) → this stage's,
        from fresh noise or from the stage's inversion of the image `start`."""
        sr = self.stages[stage]
        side, n = sr.resolution, len(generators)
        noise = torch.cat([torch.randn((1, 3, side, side), generator=g) for g in generators])
        low_noise = torch.cat([torch.randn((1, *low.shape[1:]), generator=g)
                               for g in generators]).to(self.device)
        level = torch.full((n,), sr.noise_level, dtype=torch.long, device=self.device)
        extra = self.conditioning(stage, low, level, low_noise)
        scheduler = make_sampler(sampler, self.sampler_config)
        scheduler.set_timesteps(min(steps, sr.sample_steps), device=self.device)
        if start is None:
            x = noise.to(self.device) * scheduler.init_noise_sigma
        else:
            x = self.stage_inversion(stage, start, conds, level, low_noise,
                                     len(scheduler.timesteps))
        correct = (lambda x0: keep_average(x0, low)) if sr.consistent else None
        return self.denoise(stage, scheduler, x, scheduler.timesteps, conds, uncond,
                            sr.guidance, progress, extra, correct)

    def stage_inversion(self, stage: str, image: Image.Image, conds: TextCond,
                        level: torch.Tensor, low_noise: torch.Tensor, steps: int,
                        sampler_config: dict | None = None) -> torch.Tensor:
        """x_T of `stage` for every row of `conds`: `image` at the stage's resolution run up
        its schedule by DDIM, beside its own previous-resolution image noised by `low_noise`
        to `level` (what sampling then reads, but for the image), without guidance. Sampled
        without guidance beside that same image, the stage gives `image` back up to the
        discretisation (a guided stage, as IF-II's, only nearly); beside an edited one, it keeps
        the input's fine detail where the edit leaves the image. Rows that would invert alike
        (one seed, one text: an inversion start's batch) are inverted once."""
        n = level.shape[0]
        alike = [low_noise, level, *conds.tensors().values()]
        if all(torch.equal(t[:1].expand_as(t), t) for t in alike):
            level, low_noise, conds = level[:1], low_noise[:1], conds.map(lambda v: v[:1])
        x0 = self.encode_image(image, stage)
        low = resize(x0, self._previous_resolution(stage))  # as the stage trains on it
        rows = level.shape[0]
        extra = self.conditioning(stage, low.expand(rows, -1, -1, -1), level, low_noise)
        x = self.invert(x0.expand(rows, -1, -1, -1), conds, steps, stage, extra, sampler_config)
        return x.expand(n, -1, -1, -1).clone()

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        for name, stage in self.stages.items():
            counts[name] = sum(p.numel() for p in stage.unet.parameters())
        return counts

    def info(self) -> dict:
        info = super().info()
        info["stages"] = {
            name: {"resolution": s.resolution, "noise_level": s.noise_level,
                   "sample_steps": s.sample_steps, "guidance": s.guidance,
                   "consistent": s.consistent}
            for name, s in self.stages.items()
        }
        return info


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images (N×C×H×W) at side×side: area-averaged down (as training makes the base's images),
    bilinear up (as Imagen upsamples a super-resolution stage's conditioning image)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    if side < x.shape[-1]:
        return F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def keep_average(x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x (N×C×H×W) changed by the least (per pixel, in the least-squares sense) so that its
    area average at `low`'s resolution is `low`: each block gets the difference added evenly."""
    difference = low - resize(x, low.shape[-1])
    return x + F.interpolate(difference, size=x.shape[-2:], mode="nearest")


def crop(at: torch.Tensor, side: int, grid: int, *images: torch.Tensor) -> list[torch.Tensor]:
    """The same side×side crop of every tensor in `images` (N×C×H×W), per sample where `at`
    (N×2 fractions of the room along x and y) says, starting on the `grid`."""
    room = images[0].shape[-1] - side
    if room == 0:
        return list(images)
    places = room // grid + 1
    x0, y0 = ((at * places).long().clamp(max=places - 1) * grid).T.tolist()
    return [torch.stack([im[i, :, y:y + side, x:x + side] for i, (x, y) in enumerate(zip(x0, y0))])
            for im in images]


def add_coordinates(x: torch.Tensor) -> torch.Tensor:
    """x with two more channels, the column and row of each pixel in [−1, 1] (CoordConv).

    Convolutions are blind to where they are; captions name places ("at the top left"). With the
    coordinates as input, cross-attention can tie a position word to a place directly, which a
    small UNet otherwise learns slowly, if at all, from the zero padding at the borders.
    """
    n, _, h, w = x.shape
    rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    cols = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    return torch.cat([x, cols.expand(n, 1, h, w), rows.expand(n, 1, h, w)], dim=1)


def is_pixel_model(path: Path) -> bool:
    return (path / MODEL_FILE).is_file()


def load_pixel_model(path: str | Path, device: torch.device, dtype: torch.dtype,
                     source: str | None = None) -> PixelCascadeBackend:
    """Load a model folder written by `imagic train-shapes` (or the embedded one)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    try:
        meta = json.loads((path / MODEL_FILE).read_text())
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        stages, previous = {}, unet.config.sample_size
        for name, spec in meta.get("stages", {}).items():
            if not name.isidentifier() or name == "base":
                raise ValueError(f"a stage cannot be named {name!r}")
            stages[name] = SuperResolution(
                unet=UNet2DConditionModel.from_pretrained(path / name, use_safetensors=True),
                resolution=int(spec["resolution"]), noise_level=int(spec["noise_level"]),
                max_noise_level=int(spec["max_noise_level"]),
                sample_steps=int(spec["sample_steps"]), guidance=float(spec["guidance"]),
                consistent=spec.get("consistent", False))
            if not isinstance(stages[name].consistent, bool):
                raise ValueError(f"stage {name}'s \"consistent\" must be true or false")
            if stages[name].consistent and stages[name].resolution % previous:
                raise ValueError(f"stage {name} is consistent, so its resolution must be a "
                                 f"multiple of the previous stage's {previous}")
            previous = stages[name].resolution
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path} is not a complete imagic model folder: {err}") from None
    identity = {
        "source": source or str(path.resolve()),
        "name": meta.get("name"),
        "revision": meta.get("revision"),
        "fingerprint": weights_fingerprint(unet, text_encoder,
                                           *(s.unet for s in stages.values())),
    }
    return PixelCascadeBackend(unet, text_encoder, tokenizer, scheduler_config, identity,
                               device, dtype, coord_channels=meta.get("coord_channels", 0),
                               stages=stages)
