"""TEdBench (Kawar et al. 2023): 100 image–text pairs, scored as in the paper's η figure.

Layout of the data folder (as published): `input_list.json`, a list of
`{"img_name": ..., "target_text": ...}`, and the images under `originals/` (any size, jpeg or
png; `img_name` may leave out the extension). For every pair and seed, stages 1–2 run once and
every η of the sweep is rendered; each output is scored with

- CLIP score (text–image alignment, torchmetrics; CLIP ViT-L/14 unless told otherwise), and
- 1 − LPIPS against the input (fidelity; torchmetrics, AlexNet backbone),

giving the paper's curve of CLIP score against 1 − LPIPS over η (its Fig. 9). Rows go to
rows.csv as each (pair, seed) finishes, so a stopped run resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..batch import find_original
from ..errors import InputError, ModelError
from ..images import file_sha256, load_image, save_atomic, write_text_atomic
from . import append_rows, check_same_run, read_rows_csv, save_figure

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
FIELDS = ("pair", "img_name", "text", "seed", "eta", "auto", "clip_score", "lpips_similarity",
          "file")


@dataclass(frozen=True)
class Pair:
    index: int
    img_name: str
    text: str
    path: Path

    @property
    def slug(self) -> str:
        return f"{self.index:03d}-{Path(self.img_name).stem}"


def read_pairs(data: str | Path) -> list[Pair]:
    """The pairs of a TEdBench folder, every image checked to exist; InputError otherwise."""
    data = Path(data)
    listing = data / "input_list.json"
    if not listing.is_file():
        raise InputError(f"{data} has no input_list.json: give the TEdBench folder with --data")
    try:
        entries = json.loads(listing.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{listing} is not valid JSON: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{listing} must be a non-empty list of {{img_name, target_text}}")
    pairs = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("img_name"), str)
                and isinstance(entry.get("target_text"), str) and entry["target_text"].strip()):
            raise InputError(f"{listing} entry {index} needs a string img_name and a non-empty "
                             f"target_text, got {entry!r}")
        name = entry["img_name"]
        path = find_original(data, name)
        if path is None:
            raise InputError(f"{listing} entry {index}: no image {name!r} under "
                             f"{data / 'originals'}")
        load_image(path)  # an unusable image stops the run now, not at its turn hours later
        pairs.append(Pair(index, name, " ".join(entry["target_text"].split()), path))
    return pairs


# --------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Two scorers: `clip(images, text)` and `lpips_similarity(images, reference)`, each a list
    of floats (one per image)."""

    clip: Callable[[Sequence[Image.Image], str], list[float]]
    lpips_similarity: Callable[[Sequence[Image.Image], Image.Image], list[float]]


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def clip_scorer(model: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
    """CLIP score (torchmetrics: 100·max(cos(image, text), 0)) with weights from a local folder
    or a hub id (already in the Hugging Face cache when offline)."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained(model).to(device).eval()
        processor = CLIPProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"CLIP score needs the CLIP model {model!r}, which could not be loaded "
            f"({_first(err)}): fetch it on a connected machine with `hf download {model}` "
            f"(it lands in the Hugging Face cache) or pass --clip-model PATH to a downloaded folder"
        ) from None

    features = _TensorFeatures(clip)

    def score(images: Sequence[Image.Image], text: str) -> list[float]:
        with torch.no_grad():
            return [float(clip_score(_uint8(im).to(device), text,
                                     model_name_or_path=lambda: (features, processor)))
                    for im in images]

    return score


class _TensorFeatures:
    """CLIPModel as torchmetrics 1.9 expects it: get_*_features returning tensors. Since
    transformers 5 they return an output object (the projected embedding is its pooler_output);
    torchmetrics#3407, fixed upstream after 1.9.0."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def lpips_scorer(device: str | torch.device = "cpu"):
    """1 − LPIPS (torchmetrics, AlexNet backbone and the LPIPS v0.1 linear layers it ships)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except ModuleNotFoundError as err:
        raise ModelError(f"LPIPS needs torchvision ({_first(err)}): install the torchvision "
                         f"build that matches your torch") from None
    except (OSError, RuntimeError) as err:  # the AlexNet weights are fetched by torchvision
        target = Path(torch.hub.get_dir()) / "checkpoints"
        raise ModelError(
            f"LPIPS needs torchvision's ImageNet AlexNet weights ({_first(err)}): put "
            f"alexnet-owt-7be5be79.pth (https://download.pytorch.org/models/) into {target}"
        ) from None
    metric = metric.to(device).eval()

    def similarity(images: Sequence[Image.Image], reference: Image.Image) -> list[float]:
        ref = _uint8(reference).float().div(255)[None].to(device)
        out = []
        with torch.no_grad():
            for image in images:
                x = _uint8(image.resize(reference.size)).float().div(255)[None].to(device)
                out.append(1.0 - float(metric(x, ref)))
                metric.reset()
        return out

    return similarity


def load_metrics(clip_model: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> Metrics:
    return Metrics(clip_scorer(clip_model, device), lpips_scorer(device))


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# --------------------------------------------------------------------------- the run


def check_settings(model: str | None, limit: int | None) -> None:
    """What a run needs beyond the data: a photo model (the embedded 32×32 model cannot edit
    photos), and a positive --limit."""
    if model is None:
        raise InputError("TEdBench edits photos: name a Stable Diffusion model with --model")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")


@dataclass
class Unit:
    """One (pair, seed): the batch runner's job, claimed by one process at a time."""

    pair: Pair
    seed: int

    @property
    def id(self) -> str:
        return f"{self.pair.slug}-seed{self.seed}"


def run(backend, data: str | Path, out: Path, config, metrics: Metrics, seeds=(0,),
        etas: Sequence[float] | str = "auto", keep_sessions: bool = False,
        limit: int | None = None, quiet: bool = False, rank: int = 0) -> Path:
    """Every (pair, seed) not yet in OUT/rows.csv, through the batch runner (`imagic.batch`):
    processes started by `accelerate launch` claim them one at a time, each appending its rows
    whole; a (pair, seed) that fails goes to OUT/failures.jsonl and the run goes on. Then
    summary.md and curve.png (also of a run stopped part way), by process 0.

    `etas` is a list of η, or "auto": sweep `auto_eta.AUTO_ETAS` and mark the η the rule picks
    per seed (column `auto`). Returns the CSV's path.
    """
    from ..auto_eta import AUTO_ETAS
    from ..batch import FAILURES, run_jobs

    every = read_pairs(data)
    pairs = every[:limit]
    auto = etas == "auto"
    sweep = tuple(AUTO_ETAS if auto else etas)
    out.mkdir(parents=True, exist_ok=True)
    # the data's identity too (all of it: --limit may grow): another --data would mix two
    # benchmarks' rows under the same pair numbers
    data_id = hashlib.sha256(json.dumps(
        [(p.img_name, p.text, file_sha256(p.path)) for p in every]).encode()).hexdigest()[:16]
    check_same_run(out, {"etas": list(sweep), "auto": auto, "config": config.to_dict(),
                         "data": data_id}, backend)
    path = out / "rows.csv"
    units = [Unit(p, s) for p in pairs for s in dict.fromkeys(seeds)]

    def done(unit: Unit) -> bool:
        return (unit.pair.index, unit.seed) in {(r["pair"], r["seed"]) for r in read_rows(path)}

    def work(unit: Unit) -> None:  # all of a (pair, seed) at once: it is done or not started
        rows = run_pair(backend, unit.pair, unit.seed, config, sweep, auto, metrics, out,
                        keep_sessions)
        with append_rows(path, FIELDS, exclusive=True) as commit:
            commit(rows)

    try:
        tally = run_jobs(units, out, work, done, rank=rank, progress=not quiet)
        if tally.failed:
            warnings.warn(f"{tally.failed} (pair, seed) failed: their errors are in "
                          f"{out / FAILURES}; a re-run tries them again", stacklevel=2)
    finally:  # stopped or not (Ctrl-C), summarise the rows that are there
        if rank == 0 and (rows := read_rows(path)):
            write_text_atomic(summary(rows), out / "summary.md")
            plot(rows, out / "curve.png")
    return path


def run_pair(backend, pair, seed: int, config, sweep, auto: bool, metrics: Metrics, out: Path,
             keep_sessions: bool) -> list[dict]:
    """Stages 1–3 on one pair and seed; every output saved and scored."""
    from ..auto_eta import choose_etas
    from ..editor import Imagic

    image = load_image(pair.path)
    cfg = replace(config, seed=seed, etas=sweep, seeds=(seed,))
    editor = Imagic(backend, cfg, quiet=True)
    session = editor.fit(image, pair.text)
    results = editor.generate(session)
    if keep_sessions:
        session.save(out / "sessions" / f"{pair.slug}-seed{seed}")
    chosen = choose_etas(backend, session, results)[seed].eta if auto else None
    images = [r.image for r in results]
    clip = metrics.clip(images, pair.text)
    fidelity = metrics.lpips_similarity(images, session.input_image)
    folder = out / "images" / pair.slug
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for r, c, lp in zip(results, clip, fidelity):
        name = f"eta{r.eta:.2f}_seed{seed}.png"
        save_atomic(r.image, folder / name)
        rows.append({"pair": pair.index, "img_name": pair.img_name, "text": pair.text,
                     "seed": seed, "eta": r.eta, "auto": int(r.eta == chosen),
                     "clip_score": round(c, 4), "lpips_similarity": round(lp, 4),
                     "file": f"images/{pair.slug}/{name}"})
    return rows


def read_rows(path: Path) -> list[dict]:
    def convert(r: dict) -> None:
        for key in ("pair", "seed", "auto"):
            r[key] = int(r[key])
        for key in ("eta", "clip_score", "lpips_similarity"):
            r[key] = float(r[key])

    return read_rows_csv(path, convert, "TEdBench")


def curve(rows) -> dict:
    """η → (mean CLIP score, mean 1 − LPIPS, outputs); key "auto" for the auto-η picks."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["eta"]].append(r)
        if r["auto"]:
            groups["auto"].append(r)
    return {k: (float(np.mean([g["clip_score"] for g in v])),
                float(np.mean([g["lpips_similarity"] for g in v])), len(v))
            for k, v in groups.items()}


def summary(rows) -> str:
    points = curve(rows)
    pairs = len({r["pair"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    lines = [f"# TEdBench: {pairs} pairs × {seeds} seeds", "",
             "Mean over every (pair, seed) of CLIP score (text alignment) and 1 − LPIPS to the "
             "input (fidelity).", "",
             "| η | CLIP score | 1 − LPIPS | outputs |", "| --- | --- | --- | --- |"]
    for key in sorted((k for k in points if k != "auto"), key=float) + (
            ["auto"] if "auto" in points else []):
        c, lp, n = points[key]
        label = key if key == "auto" else f"{key:g}"
        lines.append(f"| {label} | {c:.2f} | {lp:.4f} | {n} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    """CLIP score against 1 − LPIPS, one point per η (the paper's Fig. 9), auto-η as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve(rows)
    etas = sorted(k for k in points if k != "auto")
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [points[e][1] for e in etas], [points[e][0] for e in etas]
    ax.plot(xs, ys, "o-", label="Imagic, η sweep")
    for e, x, y in zip(etas, xs, ys):
        ax.annotate(f"{e:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "auto" in points:
        ax.plot([points["auto"][1]], [points["auto"][0]], "*", markersize=14, label="auto-η")
    ax.set_xlabel("1 − LPIPS to the input (fidelity)")
    ax.set_ylabel("CLIP score (text alignment)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
