"""DeepFloyd IF through diffusers: IF-I (text → 64 px) and IF-II (64 → 256 px), pixel diffusion
with a T5 text encoder, as the paper runs Imagic on Imagen.

Stages 1 and 2 run on IF-I, at the input area-averaged to 64 px; stage 2 also fine-tunes IF-II on
the input at 256 px conditioned on e_tgt; stage 3 samples IF-I at ē, then IF-II at e_tgt. x0 is
the image in [−1, 1]; e is T5's last hidden state (77 tokens × 4096 for T5-v1.1-XXL), encoded
with its attention mask as IF's pipelines do.

IF's UNets predict [ε, variance] (6 channels, "learned_range"). The loss is on the ε half, as
diffusers' IF training scripts do, and the samplers (DDIM, DPM-Solver++) read the ε half only:
they have no use for a learned variance. IF-II reads x_t beside the 64 px image upscaled to
256 px (bilinear, corners aligned) and then noised to an augmentation level by its own
`image_noising_scheduler`; the level is its class label. This mirrors IFSuperResolutionPipeline.

Naming the two stages. IF ships as two diffusers pipelines, so `--model` names both:

- `--model IF_I+IF_II`: each a hub id or a local diffusers folder, joined by "+";
- `--model DeepFloyd/IF-I-XL-v1.0` (any DeepFloyd IF-I hub id): IF-II is DeepFloyd/IF-II-L-v1.0,
  the pairing of IF's model card and diffusers' IF documentation;
- `--model FOLDER` (a local IF-I folder): IF-II is the one IF-II folder beside it, in the same
  parent folder (as `huggingface-cli download ... --local-dir` leaves the two side by side).

A session records the pair in the "+" form, so `imagic generate SESSION` loads both again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from .base import TextCond
from .cascade import PixelCascadeBackend, SuperResolution
from .diffusers_unet import make_sampler, weights_fingerprint
from .stable_diffusion import _loader_hint, load_pipeline

SR_STAGE = "sr256"  # the IF-II stage's name in sessions and `auxiliary_stages`
SEPARATOR = "+"  # between IF-I and IF-II in `--model IF_I+IF_II`
DEFAULT_IF_II = "DeepFloyd/IF-II-L-v1.0"  # IF-II for an IF-I hub id given alone
IF_I_CLASS, IF_II_CLASS = "IFPipeline", "IFSuperResolutionPipeline"  # model_index.json
TEXT_TOKENS = 77  # IF's encode_prompt reads 77 T5 tokens (the length T5 was trained at for IF)
NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default augmentation level of the 64 px image
SR_STEPS = 50  # IFSuperResolutionPipeline's default sampling steps
SR_GUIDANCE = 4.0  # IFSuperResolutionPipeline's default guidance scale
# components imagic never uses: not downloaded, not loaded
UNUSED = ("safety_checker", "feature_extractor", "watermarker")


class DeepFloydIFBackend(PixelCascadeBackend):
    """IF-I as the base model and IF-II as the one super-resolution stage ("sr256")."""

    family = "deepfloyd-if"

    def __init__(self, if_i, if_ii, identity: dict, device: torch.device, dtype: torch.dtype):
        from diffusers import DDIMScheduler, DDPMScheduler

        sr_unet = if_ii.unet
        stage = SuperResolution(
            unet=sr_unet, resolution=sr_unet.config.sample_size, noise_level=NOISE_LEVEL,
            # stage 2 draws the level uniformly up to the one sampling gives IF-II, so it trains
            # on the conditioning it will see (imagic's choice: IF's training levels are unknown)
            max_noise_level=NOISE_LEVEL, sample_steps=SR_STEPS, guidance=SR_GUIDANCE)
        super().__init__(if_i.unet, if_i.text_encoder, if_i.tokenizer, if_i.scheduler.config,
                         identity, device, dtype, stages={SR_STAGE: stage})
        self.default_preset = "deepfloyd-if"  # presets.py
        self.max_text_tokens = TEXT_TOKENS
        self.channels = self.unet.config.in_channels  # x0: 3 (the UNet outputs ε and variance)
        self.variance_type = self.noise_scheduler.config.get("variance_type")
        # IF-II samples on its own schedule's config (its thresholding differs from IF-I's) and
        # noises its conditioning image with its image_noising_scheduler
        self.sr_sampler_config = DDIMScheduler.from_config(if_ii.scheduler.config).config
        self.image_noising_scheduler = DDPMScheduler.from_config(
            if_ii.image_noising_scheduler.config)
        sr_schedule = DDPMScheduler.from_config(if_ii.scheduler.config).alphas_cumprod
        if not torch.equal(sr_schedule, self.noise_scheduler.alphas_cumprod):
            raise ModelError("IF-II's noise schedule differs from IF-I's; imagic trains both "
                             "stages on IF-I's: use a matching IF-I and IF-II")

    # -- text -------------------------------------------------------------------------------

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(prepare_text(text), truncation=False).input_ids)

    @torch.no_grad()
    def encode_text(self, texts):
        """T5's last hidden state, with the attention mask, lower-cased texts and 77 tokens as
        IF's `encode_prompt` (its clean_caption step, for web captions, is left out)."""
        tokens = self.tokenizer(
            [prepare_text(t) for t in texts], padding="max_length", truncation=True,
            max_length=self.max_text_tokens, add_special_tokens=True, return_tensors="pt")
        hidden = self.text_encoder(tokens.input_ids.to(self.device),
                                   attention_mask=tokens.attention_mask.to(self.device))[0]
        return TextCond(hidden.float())

    # -- the UNets ---------------------------------------------------------------------------

    def predict(self, stage, x_t, t, cond, extra=()):
        """The ε half of the UNet's [ε, variance] output. IF-II reads x_t beside its
        conditioning image, and the image's augmentation level as class label."""
        if stage == "base":
            output = self.unet(x_t, t, encoder_hidden_states=cond.hidden_states).sample
        else:
            upscaled, level = extra
            output = self.stages[stage].unet(
                torch.cat([x_t, upscaled], dim=1), t, encoder_hidden_states=cond.hidden_states,
                class_labels=level).sample
        return output[:, : x_t.shape[1]]

    def conditioning(self, stage, low, level, noise):
        """What IF-II reads of the 64 px image `low`: upscaled to 256 px (bilinear, corners
        aligned), then noised to `level` by the image-noising schedule (noise at 256 px), as
        IFSuperResolutionPipeline builds it."""
        side = self.stage_resolution(stage)
        upscaled = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=True)
        return self.image_noising_scheduler.add_noise(upscaled, noise, level), level

    def check_aux_finetune(self, stage, crop=0, max_level=None):
        if crop:
            raise InputError(f"{stage} has self-attention, so it fine-tunes on the whole image: "
                             f"drop aux_finetune_crop (got {crop})")
        super().check_aux_finetune(stage, 0, max_level)

    def draw(self, x0, generator, batch=1, stage="base", crop=0, max_level=None):
        """(t, ε), and for IF-II also the augmentation level (0 to `max_level`, None: its
        training maximum) and its noise, at 256 px: IF-II noises its conditioning image after
        upscaling it (never a crop: `check_aux_finetune`)."""
        if stage == "base":
            return super().draw(x0, generator, batch)
        t, noise = super().draw(x0, generator, batch)
        level = self.draw_level(stage, batch, generator, max_level)
        image_noise = torch.randn((batch, *x0.shape[1:]), generator=generator)
        return t, noise, self._upload(level), self._upload(image_noise)

    # -- stage 3 ----------------------------------------------------------------------------

    def noise_shape(self) -> tuple[int, ...]:
        return (1, self.channels, self.resolution, self.resolution)  # x0's 3, not ε and variance

    @torch.no_grad()
    def upsample(self, stage, low, conds, uncond, generators, steps, sampler="ddim",
                 progress=False, start=None):
        """IF-II: `low` (IF-I's images) → 256 px, on IF-II's own sampler config, from noise or
        from its inversion of the image `start`. Per image, its generator draws the starting
        noise, then the conditioning image's noise, in the order IFSuperResolutionPipeline
        draws them."""
        sr = self.stages[stage]
        shape = (1, self.channels, sr.resolution, sr.resolution)
        noise, image_noise = [], []
        for g in generators:
            noise.append(torch.randn(shape, generator=g))
            image_noise.append(torch.randn(shape, generator=g))
        level = torch.full((len(generators),), sr.noise_level, dtype=torch.long,
                           device=self.device)
        image_noise = torch.cat(image_noise).to(self.device)
        extra = self.conditioning(stage, low, level, image_noise)
        scheduler = make_sampler(sampler, self.sr_sampler_config)
        scheduler.set_timesteps(min(steps, sr.sample_steps), device=self.device)
        if start is None:
            x = torch.cat(noise).to(self.device) * scheduler.init_noise_sigma
        else:
            x = self.stage_inversion(stage, start, conds, level, image_noise,
                                     len(scheduler.timesteps), self.sr_sampler_config)
        return self.denoise(stage, scheduler, x, scheduler.timesteps, conds, uncond,
                            sr.guidance, progress, extra)

    # -- information ------------------------------------------------------------------------

    def info(self) -> dict:
        info = super().info()
        info["output_resolution"] = self.output_resolution
        info["variance"] = f"{self.variance_type} (imagic uses the ε half)"
        return info


def prepare_text(text: str) -> str:
    """IF's text preprocessing without its caption cleaner: lower case, no outer spaces."""
    return text.lower().strip()


# ------------------------------------------------------------------------------ loading


def is_deepfloyd_if(model: str) -> bool:
    """Whether `model` names DeepFloyd IF: the "IF_I+IF_II" form, a local IF folder (IF-I or
    IF-II), or a DeepFloyd IF hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return path.is_dir() and _pipeline_class(path) in (IF_I_CLASS, IF_II_CLASS)
    return SEPARATOR in model or model.lower().startswith("deepfloyd/if-")


def load_deepfloyd_if(model: str, device: torch.device, dtype: torch.dtype,
                      allow_pickle: bool = False, config: str | None = None,
                      revision: str | None = None) -> DeepFloydIFBackend:
    """Load IF-I and IF-II as the module docstring says `model` names them. `revision` is
    IF-I's hub revision; every failure is one ModelError line."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    if config is not None:
        raise InputError("--config is for single-file checkpoints; DeepFloyd IF loads from hub "
                         "ids or diffusers folders")
    first, second = stage_names(model)
    if_i, identity = _load(IFPipeline, "IF-I", first, allow_pickle, revision)
    if if_i.text_encoder is None or if_i.tokenizer is None:
        raise ModelError(f"{first} has no T5 text encoder or tokenizer: DeepFloyd IF needs "
                         "both (text_encoder/ and tokenizer/ of DeepFloyd/IF-I-XL-v1.0)")
    if_ii, sr_identity = _load(IFSuperResolutionPipeline, "IF-II", second, allow_pickle, None,
                               skip=("text_encoder", "tokenizer"))
    identity = {
        "source": f"{identity['source']}{SEPARATOR}{sr_identity['source']}",
        "revision": identity["revision"],
        "sr_revision": sr_identity["revision"],
        "fingerprint": weights_fingerprint(if_i.unet, if_i.text_encoder, if_ii.unet),
    }
    return DeepFloydIFBackend(if_i, if_ii, identity, device, dtype)


def stage_names(model: str) -> tuple[str, str]:
    """(IF-I, IF-II) as `model` names them (module docstring)."""
    path = Path(model).expanduser()
    if SEPARATOR in model and not path.exists():
        first, _, second = model.partition(SEPARATOR)
        if not first or not second or SEPARATOR in second:
            raise InputError(f"--model {model}: name DeepFloyd IF as IF_I+IF_II (two hub ids "
                             "or folders joined by one '+')")
        return first, second
    if path.is_dir():
        if _pipeline_class(path) == IF_II_CLASS:
            raise ModelError(f"{model} is DeepFloyd IF-II, the super-resolution stage: name "
                             f"IF-I first, --model IF_I{SEPARATOR}{model}")
        return model, str(_if_ii_beside(path))
    if model.lower().startswith("deepfloyd/if-ii"):
        raise ModelError(f"{model} is DeepFloyd IF-II, the super-resolution stage: name IF-I "
                         f"first, --model DeepFloyd/IF-I-XL-v1.0{SEPARATOR}{model}")
    return model, DEFAULT_IF_II


def _if_ii_beside(path: Path) -> Path:
    """The one IF-II folder in the IF-I folder's parent."""
    found = sorted(p for p in path.resolve().parent.iterdir()
                   if p.is_dir() and _pipeline_class(p) == IF_II_CLASS)
    if len(found) != 1:
        what = "no DeepFloyd IF-II folder" if not found else f"{len(found)} IF-II folders"
        raise ModelError(f"{what} beside {path}: name the one to use, "
                         f"--model {path}{SEPARATOR}IF_II_FOLDER_OR_ID")
    return found[0]


def _pipeline_class(path: Path) -> str | None:
    """The `_class_name` of a diffusers folder's model_index.json (None: not a pipeline)."""
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _load(pipeline_class, stage: str, name: str, allow_pickle: bool, revision: str | None,
          skip: tuple[str, ...] = ()):
    """One IF pipeline (float32) from a local folder or a hub id, without the components in
    `skip` and UNUSED (not downloaded either), and its identity (source, revision)."""
    skip = skip + UNUSED
    expected = pipeline_class.__name__
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelError(f"{name}: DeepFloyd IF loads from diffusers folders or hub ids, "
                         "not single files")
    hub = not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not path.exists() and not hub:
        raise ModelError(f"model not found: {name} (no such folder)")
    if hub:  # download (or find in the cache) only what imagic uses
        try:
            folder = Path(pipeline_class.download(
                name, revision=revision, use_safetensors=None if allow_pickle else True,
                **{component: None for component in skip}))
        except Exception as err:  # huggingface_hub raises many kinds; the user needs one line
            hint = _loader_hint(err, allow_pickle)
            if "local cache" in hint:  # its advice names single files, which IF has none of
                hint = ("not in the local cache and the hub is not reachable; connect to the "
                        "network once, or name local IF-I and IF-II folders")
            raise ModelError(f"could not load {name!r} from the hub or its cache: {hint}") from None
    else:
        folder = path
    found = _pipeline_class(folder)
    if found != expected:
        kind = f"a {found} folder" if found else "not a diffusers model folder"
        raise ModelError(f"{name} is {kind}, not DeepFloyd {stage} ({expected})")
    if stage == "IF-I":
        index = json.loads((folder / "model_index.json").read_text())
        if not (folder / "text_encoder").is_dir() or not (index.get("text_encoder") or [None])[0]:
            raise ModelError(f"{name} has no text encoder (text_encoder/): DeepFloyd IF needs "
                             "its T5 encoder; copy text_encoder/ from DeepFloyd/IF-I-XL-v1.0")
    pipe, identity = load_pipeline(pipeline_class, f"a DeepFloyd {stage}", str(folder),
                                   allow_pickle, requires_safety_checker=False,
                                   **{component: None for component in skip})
    if hub:
        identity = {"source": name, "revision": folder.name if
                    folder.parent.name == "snapshots" else revision}
    return pipe, identity
