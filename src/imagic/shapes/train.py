"""Train the ShapesWorld text-to-image model from scratch: ``imagic train-shapes``.

The UNet and the text encoder learn together (loss: MSE on ε) from images rendered on the fly,
so there is no data set to download or store.  Every random draw of step s (scenes, captions,
caption dropout, t, ε) comes from a generator seeded with (seed, s), so a run is reproducible
with any number of data workers and ``--resume`` continues exactly where the checkpoint left
off.  The exported folder uses EMA weights and is what ``load_pixel_model`` reads.

Outputs in OUT: train_log.jsonl, samples/step_XXXXXX.png, checkpoint/ (resumable) and model/.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import device_name
from ..backends.cascade import add_coordinates
from ..errors import InputError
from ..images import file_sha256, write_text_atomic
from .evaluate import DEFAULT_GUIDANCE
from .model import ModelConfig, build_model, parameter_count
from .world import IMAGE_SIZE, POSITIONS, SHAPES, caption, random_caption_and_scene, render_batch

MODEL_NAME = "shapes-32"


@dataclass
class TrainConfig:
    out: str = "shapes-run"  # output folder
    steps: int = 20_000  # total optimizer steps (a resumed run counts the ones already done)
    batch_size: int | None = None  # None: 256 on CUDA, 32 on the CPU
    # AdamW, constant after the warmup (robust to stopping early, with EMA). None: 1e-3 at batch
    # 256, the shipped model's (docs/models/shapes.md), scaled by √(batch / 256) for other
    # batches (Adam's square-root rule).
    lr: float | None = None
    warmup_steps: int = 200  # linear warmup from 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999  # EMA of the weights that get exported (UNet and text encoder)
    caption_dropout: float = 0.1  # train on "" this often, so classifier-free guidance works
    # Min-SNR-γ loss weighting (Hang et al., ICCV 2023): weight min(SNR, γ)/SNR per sample, so the
    # nearly clean timesteps (fine detail) stop dominating Adam's normalised updates and the noisy
    # ones, where layout ("at the top left") is decided, get a larger share. None: plain MSE.
    snr_gamma: float | None = 5.0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0  # weights init and every data/noise draw
    workers: int | None = None  # data processes; None: 0 on the CPU, min(12, cores - 2) on CUDA
    log_every: int = 50  # steps between train_log.jsonl lines
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    sample_every: int = 2000  # steps between sample grids (and one at the end); 0: only the end
    sample_steps: int = 50  # DDIM steps for the grids
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance for the grids
    max_minutes: float | None = None  # wall-clock budget of this invocation; then stop cleanly
    resume: bool = False  # continue from OUT/checkpoint
    quiet: bool = False  # no progress bar
    init_from: str | None = None  # start from an exported model's weights (see Trainer.warm_start)
    # models held at their --init-from weights while the others train (ShapesWorld 2: "unet",
    # "sr128", "text_encoder"); a frozen stage's loss is not computed at all
    freeze: tuple[str, ...] = ()
    # models that start from their seed rather than --init-from's weights: one whose architecture
    # changed (a wider base beside the shipped super-resolution stage)
    fresh: tuple[str, ...] = ()
    model: ModelConfig = field(default_factory=ModelConfig)
    command: str = ""  # recorded in the export's metadata

    def __post_init__(self) -> None:
        """One line, before any work, for numbers and paths no run can use."""
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma)
                                               and self.snr_gamma > 0):
            raise InputError("--snr-gamma must be 0 (off) or a positive number, "
                             f"got {self.snr_gamma}")
        for flag, value in (("--batch-size", self.batch_size),
                            ("--checkpoint-every", self.checkpoint_every)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be at least 1, got {value}")
        for flag, value in (("--workers", self.workers), ("--sample-every", self.sample_every)):
            if value is not None and value < 0:
                raise InputError(f"{flag} must be 0 or more, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes)
                                                 and self.max_minutes > 0):
            raise InputError(f"--max-minutes must be a positive number, got {self.max_minutes}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be between 0 and 2^63 - 1, got {self.seed}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise InputError(f"--out {self.out} is a file; choose a folder")
        if self.init_from is not None and not (Path(self.init_from)
                                               / "imagic_model.json").is_file():
            raise InputError(f"--init-from {self.init_from} is not an exported ShapesWorld "
                             "model folder (no imagic_model.json)")
        if self.freeze and self.init_from is None and not self.resume:
            raise InputError("--freeze holds models at their --init-from weights: give "
                             "--init-from too")
        if self.fresh and self.init_from is None:
            raise InputError("--fresh starts some models from their seed instead of --init-from's "
                             "weights: give --init-from too")
        both = sorted(set(self.fresh) & set(self.freeze))
        if both:
            raise InputError(f"--fresh and --freeze both name {', '.join(both)}: a model held at "
                             "its --init-from weights cannot start from its seed")


# --------------------------------------------------------------------------- data


def batch_for_step(seed: int, step: int, batch_size: int, dropout: float,
                   timesteps: int) -> dict:
    """Everything random about optimizer step `step`: images, captions, t and ε.

    A pure function of (seed, step), which makes runs reproducible whatever the worker count.
    """
    rng = np.random.default_rng([seed, step])
    scenes, captions = [], []
    for _ in range(batch_size):
        scene, text = random_caption_and_scene(rng)
        scenes.append(scene)
        captions.append("" if rng.random() < dropout else text)
    g = torch.Generator().manual_seed(int(rng.integers(2**63)))
    return {
        "images": torch.from_numpy(render_batch(scenes)),  # uint8 N×32×32×3
        "captions": captions,
        "timesteps": torch.randint(0, timesteps, (batch_size,), generator=g),
        "noise": torch.randn((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g),
    }


class ShapesStream(torch.utils.data.IterableDataset):
    """Batches for steps start, start+1, ..., end-1; worker w of W renders steps ≡ w (mod W).

    The DataLoader reads workers round-robin, so batches arrive in step order. `make_batch` is a
    world's `batch_for_step` (a module-level function, so worker processes can receive it).
    """

    def __init__(self, seed: int, start: int, end: int, batch_size: int, dropout: float,
                 timesteps: int, make_batch: Callable[..., dict] = batch_for_step):
        super().__init__()
        self.seed, self.start, self.end = seed, start, end
        self.batch_size, self.dropout, self.timesteps = batch_size, dropout, timesteps
        self.make_batch = make_batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.end, workers):
            yield self.make_batch(self.seed, step, self.batch_size, self.dropout, self.timesteps)


# --------------------------------------------------------------------------- files


def _atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final`; `_commit_dir` swaps it into place."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; a crash midway leaves `final.old`, which `_existing` finds."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _existing(final: Path) -> Path | None:
    for path in (final, final.with_name(final.name + ".old")):
        if (path / "state.json").is_file():
            return path
    return None


def _write_json(data: dict, path: Path) -> None:
    write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer state as (tensors for safetensors, JSON-able rest): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return _cpu_tensors(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _grown_input(own: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether `own` is the convolution `saved` with more input channels (`warm_start`)."""
    return (own.ndim == saved.ndim == 4 and own.shape[0] == saved.shape[0]
            and own.shape[1] > saved.shape[1] and own.shape[2:] == saved.shape[2:])


# --------------------------------------------------------------------------- the trainer


def _fixed_prompts(count: int = 16) -> list[str]:
    """Grid captions that cover every shape and many colours, sizes and positions."""
    rng = np.random.default_rng(1234)
    prompts = []
    for i in range(count):
        scene, _ = random_caption_and_scene(rng)
        scene = scene.replace(shape=SHAPES[i % 3], position=POSITIONS[(i * 4) % 9])
        prompts.append(caption(scene, template=0))
    return prompts


class Trainer:
    """Holds the models, the optimizer and the EMA; `run` trains, checkpoints and exports.

    A world's trainer (this one: ShapesWorld's one-stage model; `imagic.shapes2.train`: the
    cascade) says which models it trains (`build_models`), what a batch is (`make_batch`), its
    loss (`batch_loss`), how it samples and draws its grids, and what its export adds.
    """

    model_name = MODEL_NAME
    description = "ShapesWorld 32×32 pixel-space text-to-image model (imagic)"
    make_batch = staticmethod(batch_for_step)

    def __init__(self, config: TrainConfig):
        from ..backends import resolve_device

        self.config = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        cuda = self.device.type == "cuda"
        self.batch_size = config.batch_size or (256 if cuda else 32)
        self.lr = config.lr or 1e-3 * math.sqrt(self.batch_size / 256)
        if config.workers is None:
            self.workers = min(12, max((os.cpu_count() or 1) - 2, 0)) if cuda else 0
        else:
            self.workers = config.workers
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(config.seed)
        self.models, self.tokenizer, self.scheduler = self.build_models()
        for module in self.models.values():
            module.to(self.device).train()
        # channels_last: oneDNN's convolutions (forward and backward) run faster with it on the
        # CPU (docs/models/shapes.md)
        self.channels_last = not cuda
        if self.channels_last:
            for name, module in self.models.items():
                if name != "text_encoder":
                    module.to(memory_format=torch.channels_last)
        if not set(config.freeze) < set(self.models):
            raise InputError(f"--freeze takes some of {', '.join(self.models)}, not all; got "
                             f"{', '.join(config.freeze)}")
        if not set(config.fresh) <= set(self.models):
            raise InputError(f"--fresh takes some of {', '.join(self.models)}; got "
                             f"{', '.join(config.fresh)}")
        if config.init_from and not config.resume:
            self.warm_start(Path(config.init_from))
        for name in config.freeze:  # no gradient, no dropout
            self.models[name].requires_grad_(False).eval()
        self.params = {f"{prefix}.{k}": v for prefix, module in self.models.items()
                       if self.trains(prefix) for k, v in module.named_parameters()}
        self.ema = {k: v.detach().clone() for k, v in self.params.items()}
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=self.lr, weight_decay=config.weight_decay,
            **({"fused": True} if cuda else {}),
        )
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.step = 0
        self.samples_seen = 0
        self.elapsed = 0.0  # training seconds over all invocations

    def build_models(self):
        """({name: module} of everything trained, the tokenizer, the noise scheduler)."""
        unet, text_encoder, tokenizer, scheduler = build_model(self.config.model)
        return {"unet": unet, "text_encoder": text_encoder}, tokenizer, scheduler

    @property
    def unet(self) -> torch.nn.Module:
        return self.models["unet"]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.models["text_encoder"]

    @torch.no_grad()
    def warm_start(self, folder: Path) -> None:
        """Copy an exported model's weights in, but for the models of `fresh`. A UNet input layer
        that grew (coordinate channels added) keeps its old filters and starts the new channels
        at zero, so the warm-started model first computes exactly what the old one did (as SD
        inpainting models are made); any other change of architecture is refused."""
        from safetensors.torch import load_file

        for name, module in self.models.items():
            if name in self.config.fresh:
                continue
            file = "model.safetensors" if name == "text_encoder" else \
                "diffusion_pytorch_model.safetensors"
            weights = load_file(folder / name / file)
            own = module.state_dict()
            if (name != "text_encoder" and set(weights) != set(own)) or any(
                    own[k].shape != v.shape and not _grown_input(own[k], v)
                    for k, v in weights.items() if k in own):
                raise InputError(f"--init-from {folder}: its {name} has another architecture "
                                 f"than this run's; --fresh {name} starts it from its seed")
            if name == "text_encoder":
                module.load_state_dict(weights, strict=False)
                continue
            for key, value in weights.items():
                if own[key].shape != value.shape:  # conv_in: more input channels now
                    grown = torch.zeros_like(own[key])
                    grown[:, : value.shape[1]] = value
                    weights[key] = grown
            module.load_state_dict(weights)

    # -- one step ------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / max(self.config.warmup_steps, 1))

    def sample_losses(self, batch: dict) -> torch.Tensor:
        """Per-sample ‖ε − ε_θ(x_t, t, c)‖² (mean over pixels) of a batch, and its timesteps."""
        dev = self.device
        x0 = batch["images"].to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1
        noise = batch["noise"].to(dev, non_blocking=True)
        t = batch["timesteps"].to(dev, non_blocking=True)
        ids = self.tokenizer(batch["captions"], padding="max_length", truncation=True,
                             max_length=self.config.model.max_tokens, return_tensors="pt")
        ids = ids.input_ids.to(dev, non_blocking=True)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if self.config.model.coord_channels:
            x_t = add_coordinates(x_t)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hidden = self.text_encoder(ids)[0]
            prediction = self.unet(x_t, t, encoder_hidden_states=hidden).sample
        return F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3)), t

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """1 per sample, or Min-SNR-γ's min(SNR(t), γ) / SNR(t)."""
        if self.config.snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.alphas[t] / (1 - self.alphas[t])
        return snr.clamp(max=self.config.snr_gamma) / snr

    def batch_loss(self, batch: dict) -> torch.Tensor:
        """The loss a step minimises: the weighted mean of the per-sample losses."""
        losses, t = self.sample_losses(batch)
        return (losses * self.loss_weights(t)).mean()

    def train_step(self, batch: dict) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.batch_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.samples_seen += len(batch["captions"])
        self.update_ema()
        return loss.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        # Warm-up of the decay (as in diffusers' EMAModel) so early exports are not the init.
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.values()), list(self.params.values()), 1 - decay)

    # -- EMA copies, samples and export --------------------------------------------------

    def trains(self, name: str) -> bool:
        """Whether the model `name` learns in this run (not in --freeze)."""
        return name not in self.config.freeze

    def ema_models(self) -> dict[str, torch.nn.Module]:
        """Deep copies of every model, the trained ones carrying the EMA weights."""
        copies = {name: copy.deepcopy(module) for name, module in self.models.items()}
        with torch.no_grad():
            for prefix, module in copies.items():
                if not self.trains(prefix):
                    continue
                for name, p in module.named_parameters():
                    p.copy_(self.ema[f"{prefix}.{name}"])
                    p.grad = None
                # safetensors saves contiguous tensors
                module.to(memory_format=torch.contiguous_format)
        return {name: module.eval() for name, module in copies.items()}

    def ema_backend(self):
        from ..backends.cascade import PixelCascadeBackend

        models = self.ema_models()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        identity = {"source": str(self.out), "name": self.model_name,
                    "revision": f"step{self.step}"}
        return PixelCascadeBackend(models["unet"], models["text_encoder"], self.tokenizer,
                                   self.scheduler.config, identity, self.device, dtype,
                                   coord_channels=self.config.model.coord_channels,
                                   stages=self.stages(models))

    def stages(self, models: dict[str, torch.nn.Module]) -> dict:
        """The super-resolution stages of the EMA models (`backends.cascade.SuperResolution`)."""
        return {}

    def fixed_prompts(self) -> list[str]:
        return _fixed_prompts()

    def sample_grid(self, images, prompts: list[str], title: str):
        return sample_grid(images, prompts, title)

    def write_samples(self) -> Path:
        backend = self.ema_backend()
        prompts = self.fixed_prompts()
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = backend.sample(backend.encode_text(prompts), backend.encode_text([""]),
                                generators, self.config.sample_steps, self.config.guidance)
        grid = self.sample_grid(images, prompts,
                                f"step {self.step}, guidance {self.config.guidance:g}")
        path = self.out / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..images import save_atomic

        save_atomic(grid, path)
        return path

    def export(self) -> Path:
        """OUT/model: the layout `load_pixel_model` reads, with the EMA weights."""
        final = self.out / "model"
        tmp = _atomic_dir(final)
        models = self.ema_models()
        for name, module in models.items():  # each in its folder: unet/, text_encoder/, sr128/
            module.to("cpu").save_pretrained(tmp / name, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        self.scheduler.save_pretrained(tmp / "scheduler")
        weights = tmp / "unet" / "diffusion_pytorch_model.safetensors"
        from ..session import library_versions

        meta = {
            "name": self.model_name,
            "revision": file_sha256(weights)[:12],
            "description": self.description,
            "coord_channels": self.config.model.coord_channels,
            **self.export_meta(),
            "initialised_from": self.config.init_from,
            "parameters": {name: parameter_count(m) for name, m in models.items()},
            "training": {
                "steps": self.step,
                "samples_seen": self.samples_seen,
                "wall_clock_s": round(self.elapsed, 1),
                "device": device_name(self.device),
                "batch_size": self.batch_size,
                "lr": self.lr,
                "ema_decay": self.config.ema_decay,
                "caption_dropout": self.config.caption_dropout,
                "snr_gamma": self.config.snr_gamma,
                "seed": self.config.seed,
                "frozen": list(self.config.freeze),
                "fresh": list(self.config.fresh),
                "command": self.config.command,
                "versions": library_versions(),
            },
            "model_config": self.config.model.to_dict(),
        }
        _write_json(meta, tmp / "imagic_model.json")
        for path in tmp.rglob("*"):  # safetensors writes 0600: the folder ships in the package
            path.chmod(0o755 if path.is_dir() else 0o644)
        _commit_dir(tmp, final)
        return final

    def export_meta(self) -> dict:
        """What a world adds to `imagic_model.json` (a cascade: its "stages")."""
        return {}

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        final = self.out / "checkpoint"
        tmp = _atomic_dir(final)
        for name, module in self.models.items():
            save_file(_cpu_tensors(module.state_dict()), tmp / f"{name}.safetensors")
        save_file(_cpu_tensors(self.ema), tmp / "ema.safetensors")
        tensors, optim_meta = _optimizer_to_files(self.optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "elapsed_s": self.elapsed,
            "batch_size": self.batch_size,
            "seed": self.config.seed,
            "caption_dropout": self.config.caption_dropout,
            "snr_gamma": self.config.snr_gamma,
            "frozen": list(self.config.freeze),
            "model_config": self.config.model.to_dict(),
            "optimizer": optim_meta,
        }
        _write_json(state, tmp / "state.json")  # last: its presence marks a complete checkpoint
        _commit_dir(tmp, final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        from ..errors import InputError

        state = json.loads((path / "state.json").read_text())
        if state["model_config"] != self.config.model.to_dict():
            changed = [k for k, v in self.config.model.to_dict().items()
                       if state["model_config"].get(k) != v]
            raise InputError(f"{path} was written for another model configuration (its "
                             f"{', '.join(changed)} differ): resume with the same")
        if state.get("frozen", []) != list(self.config.freeze):
            raise InputError(f"{path} was written with --freeze "
                             f"{','.join(state.get('frozen', [])) or '(none)'}: resume with the "
                             "same")
        if state.get("snr_gamma") != self.config.snr_gamma:
            print(f"note: resuming with --snr-gamma {self.config.snr_gamma} "
                  f"(checkpoint: {state.get('snr_gamma')})", file=sys.stderr)
        if state["batch_size"] != self.batch_size or state["seed"] != self.config.seed:
            print(f"note: resuming with batch size {self.batch_size} and seed {self.config.seed} "
                  f"(checkpoint: {state['batch_size']}, {state['seed']})", file=sys.stderr)
        dev = self.device
        for name, module in self.models.items():
            module.load_state_dict(load_file(path / f"{name}.safetensors", device=str(dev)))
        ema = load_file(path / "ema.safetensors", device=str(dev))
        if ema.keys() != self.ema.keys():
            raise ValueError(f"{path}: EMA weights do not match the model")
        self.ema = {k: ema[k] for k in self.params}  # the files sort names; keep the model's order
        self.optimizer.load_state_dict(_optimizer_from_files(
            load_file(path / "optimizer.safetensors"), state["optimizer"]))
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.elapsed = state["elapsed_s"]

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> Path:
        from tqdm.auto import tqdm

        from ..errors import InputError

        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        found = _existing(self.out / "checkpoint")
        if cfg.resume and found is None:
            raise InputError(f"--resume: no checkpoint in {self.out}")
        if not cfg.resume and found is not None:
            raise InputError(f"{self.out} already holds a run: pass --resume to continue it, "
                             "or choose another --out")
        if cfg.resume:
            self.load_checkpoint(found)
        # the log as far as the checkpoint (a run that died before its first one: empty)
        _truncate_log(self.out / "train_log.jsonl", self.step)
        if not cfg.quiet:
            sizes = " + ".join(f"{name} {parameter_count(m):,}"
                               for name, m in self.models.items())
            frozen = f" (frozen: {', '.join(cfg.freeze)})" if cfg.freeze else ""
            print(f"device {device_name(self.device)}, batch {self.batch_size}, "
                  f"workers {self.workers}, parameters {sizes}{frozen}, "
                  f"step {self.step}/{cfg.steps}")
        stream = ShapesStream(cfg.seed, self.step, cfg.steps, self.batch_size,
                              cfg.caption_dropout, self.scheduler.config.num_train_timesteps,
                              self.make_batch)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        budget = math.inf if cfg.max_minutes is None else cfg.max_minutes * 60
        start = last_time = time.perf_counter()
        elapsed_before = self.elapsed
        last_step, losses = self.step, []
        log = (self.out / "train_log.jsonl").open("a")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                   disable=cfg.quiet, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file: a line per 30 s
        try:
            for batch in loader:
                losses.append(self.train_step(batch))
                self.elapsed = elapsed_before + time.perf_counter() - start
                bar.update(1)
                done = self.step >= cfg.steps or time.perf_counter() - start >= budget
                if self.step % cfg.log_every == 0 or done:
                    now = time.perf_counter()
                    loss = torch.stack(losses).mean().item()  # one device sync per log line
                    speed = (self.step - last_step) * self.batch_size / max(now - last_time, 1e-9)
                    log.write(json.dumps({
                        "step": self.step, "loss": round(loss, 5),
                        "lr": self.lr_at(self.step - 1), "samples_per_s": round(speed, 1),
                        "elapsed_s": round(self.elapsed, 1),
                    }) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    last_step, last_time, losses = self.step, now, []
                if done:
                    break
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_samples()
        finally:
            bar.close()
            log.close()
        self.save_checkpoint()
        grid = self.write_samples()
        model = self.export()
        if not cfg.quiet:
            print(f"step {self.step}: samples {grid}, checkpoint {self.out / 'checkpoint'}, "
                  f"model {model} ({_folder_mb(model):.1f} MB)")
        return model


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def sample_grid(images, prompts: list[str], title: str, columns: int = 4):
    """Images upscaled with nearest-neighbour, each with its caption and the detector's verdict
    (green: every attribute right, red: not)."""
    from PIL import Image, ImageDraw, ImageFont

    from .detect import compare, detect
    from .world import parse_caption

    scale, pad, label = 4, 6, 30
    cell = IMAGE_SIZE * scale
    width = 150
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, 24 + rows * (cell + label + pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    draw.text((pad, 4), title, fill="black", font=ImageFont.load_default(size=14))
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x = pad + (i % columns) * (width + pad)
        y = 24 + (i // columns) * (cell + label + pad)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        ok = all(compare(detect(np.asarray(image)), parse_caption(prompt)).values())
        attrs = parse_caption(prompt)
        text = f"{attrs['size']} {attrs['colour']} {attrs['shape']}\n{attrs['position']}"
        draw.text((x, y + cell + 2), text, fill=(0, 130, 0) if ok else (200, 0, 0), font=font)
    return grid


def train(config: TrainConfig) -> Path:
    """Train (or resume) and export; returns the exported model folder. The model config says
    which world: a `ModelConfig`, ShapesWorld's model; a `CascadeConfig`, ShapesWorld 2's."""
    from ..shapes2.model import CascadeConfig
    from ..shapes2.train import CascadeTrainer

    trainer = CascadeTrainer if isinstance(config.model, CascadeConfig) else Trainer
    return trainer(config).run()


def _truncate_log(path: Path, step: int) -> None:
    """On resume: drop the log lines past the checkpoint's step, which the run will log again
    (a run stopped at step 1700 with its checkpoint at 1000 redoes 1001–1700)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic("".join(kept), path)
