"""Train the ShapesWorld 2 cascade from scratch: ``imagic train-shapes --world 2``.

The base UNet (32×32), the super-resolution UNet (32→128) and the text encoder learn together
from 128×128 scenes rendered on the fly: each step's loss is the base's ε-MSE on the scenes
area-averaged to 32×32 plus the super-resolution stage's ε-MSE on a random crop of the 128×128
scene (`CascadeConfig.sr_crop`; as Imagen's, the stage is local, and a crop costs a fraction of
the whole), given the 32×32 scene noised to a random augmentation level and upsampled (Imagen's
noise conditioning augmentation), both Min-SNR weighted. The loop, checkpoints (resumable,
`--resume`), warm starts (`--init-from`), EMA and export are
:class:`imagic.shapes.train.Trainer`'s; every random draw of step s comes from (seed, s), so a
run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.cascade import SuperResolution, add_coordinates, crop, resize
from ..shapes.train import Trainer
from .model import BASE_SIZE, CROP_GRID, SR_STAGE, CascadeConfig, build_models
from .world import (
    COLOURS,
    IMAGE_SIZE,
    KINDS,
    POSES,
    POSITIONS,
    SIZES,
    Thing,
    caption,
    random_caption_and_scene,
    render_batch,
)

MODEL_NAME = "shapes2-128"


def batch_for_step(seed: int, step: int, batch_size: int, dropout: float,
                   timesteps: int, sr_crop: int = IMAGE_SIZE) -> dict:
    """Everything random about optimizer step `step`, a pure function of (seed, step): the
    scenes (uint8 N×128×128×3) and captions, then per stage t and ε (the super-resolution
    stage's at the side of its crop), its augmentation draw (a fraction of its highest level)
    and noise, and where its crop lies (fractions of the room along x and y)."""
    rng = np.random.default_rng([seed, step])
    scenes, captions = [], []
    for _ in range(batch_size):
        scene, text = random_caption_and_scene(rng)
        scenes.append(scene)
        captions.append("" if rng.random() < dropout else text)
    g = torch.Generator().manual_seed(int(rng.integers(2**63)))
    n = batch_size
    return {
        "images": torch.from_numpy(render_batch(scenes)),
        "captions": captions,
        "timesteps": torch.randint(0, timesteps, (n,), generator=g),
        "noise": torch.randn((n, 3, BASE_SIZE, BASE_SIZE), generator=g),
        "sr_timesteps": torch.randint(0, timesteps, (n,), generator=g),
        "sr_noise": torch.randn((n, 3, sr_crop, sr_crop), generator=g),
        "aug_fraction": torch.rand((n,), generator=g),
        "aug_noise": torch.randn((n, 3, BASE_SIZE, BASE_SIZE), generator=g),
        "crop_at": torch.rand((n, 2), generator=g),
    }


def fixed_prompts() -> list[str]:
    """Grid captions: the cat in each pose and place, alone and beside the rigid kinds."""
    prompts = []
    for i in range(12):
        cat = Thing(kind="cat", pose=POSES[i % 3], colour=COLOURS[i % 5],
                    size=SIZES[(i // 3) % 2], position=POSITIONS[i % 3])
        things = [cat]
        if i >= 6:  # a second object in another slot
            things.append(Thing(kind=KINDS[1 + i % 3], pose=None, colour=COLOURS[(i + 2) % 5],
                                size="large", position=POSITIONS[(i + 1) % 3]))
        prompts.append(caption(things, prefix=""))
    return prompts


class CascadeTrainer(Trainer):
    """:class:`Trainer` for the base + super-resolution cascade of ShapesWorld 2."""

    model_name = MODEL_NAME
    description = ("ShapesWorld 2 pixel-space cascade: 32×32 text-to-image base and 32→128 "
                   "super-resolution (imagic)")
    def __init__(self, config):
        super().__init__(config)
        # the super-resolution noise is drawn at the crop's side, not the scene's
        self.make_batch = partial(batch_for_step, sr_crop=config.model.sr_crop)

    def build_models(self):
        if not isinstance(self.config.model, CascadeConfig):
            raise TypeError("CascadeTrainer trains a CascadeConfig model")
        unet, sr_unet, text_encoder, tokenizer, scheduler = build_models(self.config.model)
        return {"unet": unet, SR_STAGE: sr_unet, "text_encoder": text_encoder}, tokenizer, \
            scheduler

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def _input(self, x: torch.Tensor, coordinates: bool = True) -> torch.Tensor:
        if coordinates and self.config.model.coord_channels:
            x = add_coordinates(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sample_losses(self, batch: dict):
        """Per-sample ε-MSE of each stage this run trains, with its timesteps:
        {"base": (losses, t), "sr128": (losses, t_sr)}; a frozen stage (`--freeze`) is left out."""
        dev, model = self.device, self.config.model
        x = batch["images"].to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1
        low = resize(x, BASE_SIZE)  # the base's images, as the engine brings an input down
        get = {k: batch[k].to(dev, non_blocking=True) for k in
               ("timesteps", "noise", "sr_timesteps", "sr_noise", "aug_fraction", "aug_noise")}
        ids = self.tokenizer(batch["captions"], padding="max_length", truncation=True,
                             max_length=model.max_tokens, return_tensors="pt")
        ids = ids.input_ids.to(dev, non_blocking=True)
        losses = {}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.set_grad_enabled(self.trains("text_encoder")):
                hidden = self.text_encoder(ids)[0]
            if self.trains("unet"):
                t = get["timesteps"]
                base = self.unet(self._input(self._noised(low, get["noise"], t)), t,
                                 encoder_hidden_states=hidden).sample
                losses["base"] = (F.mse_loss(base.float(), get["noise"], reduction="none")
                                  .mean(dim=(1, 2, 3)), t)
            if self.trains(SR_STAGE):
                t_sr = get["sr_timesteps"]
                level = (get["aug_fraction"] * (model.sr_max_noise_level + 1)).long().clamp(
                    max=model.sr_max_noise_level)
                conditioning = resize(self._noised(low, get["aug_noise"], level), IMAGE_SIZE)
                x, conditioning = crop(batch["crop_at"], model.sr_crop, CROP_GRID, x,
                                       conditioning)
                sr_input = torch.cat([self._noised(x, get["sr_noise"], t_sr), conditioning],
                                     dim=1)
                sr = self.models[SR_STAGE](self._input(sr_input, coordinates=False), t_sr,
                                           encoder_hidden_states=hidden,
                                           class_labels=level).sample
                losses[SR_STAGE] = (F.mse_loss(sr.float(), get["sr_noise"], reduction="none")
                                    .mean(dim=(1, 2, 3)), t_sr)
        return losses

    def batch_loss(self, batch: dict) -> torch.Tensor:
        """The trained stages' weighted mean losses, summed."""
        return sum((losses * self.loss_weights(t)).mean()
                   for losses, t in self.sample_losses(batch).values())

    def stages(self, models: dict[str, torch.nn.Module]) -> dict:
        spec = self.config.model.stage_meta()[SR_STAGE]
        return {SR_STAGE: SuperResolution(unet=models[SR_STAGE], **spec)}

    def export_meta(self) -> dict:
        return {"world": "shapes2", "stages": self.config.model.stage_meta()}

    def fixed_prompts(self) -> list[str]:
        return fixed_prompts()

    def sample_grid(self, images, prompts: list[str], title: str):
        return sample_grid(images, prompts, title)


def sample_grid(images, prompts: list[str], title: str, columns: int = 4):
    """The 128 px samples, each with its caption, green where the detectors read every named
    attribute and the count right, red where not."""
    from PIL import Image, ImageDraw, ImageFont

    from .detect import compare, detect
    from .world import parse_caption

    pad, label = 6, 40
    cell = IMAGE_SIZE * 2
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell + pad) + pad, 24 + rows * (cell + label + pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    draw.text((pad, 4), title, fill="black", font=ImageFont.load_default(size=14))
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x = pad + (i % columns) * (cell + pad)
        y = 24 + (i // columns) * (cell + label + pad)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        ok = compare(detect(np.asarray(image)), parse_caption(prompt))["all"]
        words = prompt.split(" and ")
        draw.text((x, y + cell + 2), "\n".join(words), fill=(0, 130, 0) if ok else (200, 0, 0),
                  font=font)
    return grid
