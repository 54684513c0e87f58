"""The TEdBench runner on a mini-TEdBench folder made here: it reads the official layout, runs
every pair and seed, scores with CLIP score (a tiny random CLIP) and an LPIPS-shaped fidelity
scorer, writes the CSV, summary and curve, and resumes. Scores are not checked: the weights are
random. Bad data and missing metric weights give one line and exit code 2."""

import csv
import importlib.util
import json

import pytest

from conftest import WORDS, make_photo
from imagic.bench import tedbench
from imagic.bench.tedbench import FIELDS, Metrics, clip_scorer, read_pairs, run
from imagic.cli import main
from imagic.errors import InputError, ModelError

TEXTS = ["a photo of a red dog", "a photo of a sitting cat", "a painting of the dog in snow"]


@pytest.fixture
def mini_tedbench(tmp_path):
    """Two images of different sizes and formats, three texts (one image used twice)."""
    data = tmp_path / "tedbench"
    (data / "originals").mkdir(parents=True)
    make_photo((80, 64), seed=0).save(data / "originals" / "dog.png")
    make_photo((72, 96), seed=1).save(data / "originals" / "cat.jpg", quality=95)
    entries = [{"img_name": "dog.png", "target_text": TEXTS[0]},
               {"img_name": "cat", "target_text": TEXTS[1]},  # extension left out
               {"img_name": "dog.png", "target_text": TEXTS[2]}]
    (data / "input_list.json").write_text(json.dumps(entries))
    return data


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP (ViT on 32 px, 2-layer text tower) with a processor, as a folder."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from imagic.tokenizer import word_level_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = word_level_clip_tokenizer(WORDS, max_length=16)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16,
                                   intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32,
                                       patch_size=8).to_dict(),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def pixel_fidelity(images, reference):
    """Stands in for 1 − LPIPS where torchvision (LPIPS's backbone) is not installed: the same
    signature and range, 1 − mean absolute pixel difference."""
    import numpy as np

    ref = np.asarray(reference, dtype=float) / 255
    return [1 - float(np.abs(np.asarray(im.resize(reference.size), dtype=float) / 255
                             - ref).mean()) for im in images]


def fidelity_scorer():
    if importlib.util.find_spec("torchvision") is None:
        return pixel_fidelity
    return tedbench.lpips_scorer()  # pragma: no cover - on machines with torchvision


FAST = ["--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "2"]


def test_reads_the_official_layout(mini_tedbench):
    pairs = read_pairs(mini_tedbench)
    assert [p.text for p in pairs] == TEXTS
    assert [p.path.name for p in pairs] == ["dog.png", "cat.jpg", "dog.png"]
    assert [p.slug for p in pairs] == ["000-dog", "001-cat", "002-dog"]


@pytest.mark.parametrize("listing, message", [
    (None, "no input_list.json"),
    ("{not json", "not valid JSON"),
    ("[]", "non-empty list"),
    ('[{"img_name": "dog.png"}]', "target_text"),
    ('[{"img_name": "missing.png", "target_text": "a dog"}]', "no image 'missing.png'"),
])
def test_bad_data_folder_is_refused_with_the_reason(mini_tedbench, listing, message):
    path = mini_tedbench / "input_list.json"
    if listing is None:
        path.unlink()
    else:
        path.write_text(listing)
    with pytest.raises(InputError, match=message):
        read_pairs(mini_tedbench)


def test_run_scores_every_eta_writes_csv_summary_curve_and_resumes(
        tmp_path, mini_tedbench, tiny_model_dir, tiny_clip_dir):
    from dataclasses import replace

    from imagic.backends import load_backend
    from imagic.presets import get_preset

    backend = load_backend(str(tiny_model_dir), device="cpu")
    config = replace(get_preset("paper"), embed_steps=2, finetune_steps=2, sample_steps=2)
    metrics = Metrics(clip_scorer(str(tiny_clip_dir)), fidelity_scorer())
    out = tmp_path / "out"
    path = run(backend, mini_tedbench, out, config, metrics, seeds=(0, 1), etas="auto",
               keep_sessions=True, limit=2, quiet=True)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = list(reader)
    from imagic.auto_eta import AUTO_ETAS

    assert len(rows) == 2 * 2 * len(AUTO_ETAS)  # 2 pairs (--limit) × 2 seeds × the sweep
    for pair in (0, 1):
        for seed in (0, 1):
            group = [r for r in rows if int(r["pair"]) == pair and int(r["seed"]) == seed]
            assert sorted(float(r["eta"]) for r in group) == list(AUTO_ETAS)
            assert sum(int(r["auto"]) for r in group) == 1  # auto-η marks one η per seed
            assert group[0]["text"] == TEXTS[pair]
    for r in rows:
        assert 0 <= float(r["clip_score"]) <= 100
        assert 0 <= float(r["lpips_similarity"]) <= 1
        assert (out / r["file"]).is_file()
    assert (out / "sessions" / "000-dog-seed0" / "manifest.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "# TEdBench: 2 pairs × 2 seeds" in summary
    assert "| auto |" in summary and "| 0.8 |" in summary
    assert (out / "curve.png").stat().st_size > 0
    # resumable: the finished (pair, seed) are not redone; the third pair adds only its rows
    run(backend, mini_tedbench, out, config, metrics, seeds=(0, 1), etas="auto", quiet=True)
    with path.open() as f:
        rows2 = list(csv.DictReader(f))
    assert rows2[: len(rows)] == rows
    assert len(rows2) == len(rows) * 3 // 2
    # another sweep in the same folder would mix two runs in the summary: refused
    with pytest.raises(InputError, match="other settings"):
        run(backend, mini_tedbench, out, config, metrics, seeds=(0,), etas=[0.5, 1.0],
            quiet=True)
    # and so would other data under the same pair numbers
    entries = json.loads((mini_tedbench / "input_list.json").read_text())
    entries[0]["target_text"] = "a photo of a jumping dog"
    (mini_tedbench / "input_list.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match="other settings"):
        run(backend, mini_tedbench, out, config, metrics, seeds=(0,), quiet=True)


def test_cli_end_to_end(tmp_path, mini_tedbench, tiny_model_dir, tiny_clip_dir, monkeypatch,
                        capsys):
    monkeypatch.setattr(tedbench, "lpips_scorer", lambda device="cpu": fidelity_scorer())
    out = tmp_path / "out"
    assert main(["bench", "tedbench", "--data", str(mini_tedbench), "--model",
                 str(tiny_model_dir), "--clip-model", str(tiny_clip_dir), "--eta", "0.6,1.0",
                 "--limit", "1", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| 0.6 |" in printed and "curve.png" in printed
    with (out / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2


def test_missing_clip_weights_offline_is_one_line_and_writes_nothing(
        tmp_path, mini_tedbench, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code = main(["bench", "tedbench", "--data", str(mini_tedbench), "--model",
                 str(tiny_model_dir), "--clip-model", str(tmp_path / "no-such-clip"),
                 "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--clip-model" in err
    assert not out.exists()


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    assert main(["bench", "tedbench", "--data", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "input_list.json" in capsys.readouterr().err


def test_tedbench_needs_a_photo_model(mini_tedbench, tmp_path, capsys):
    assert main(["bench", "tedbench", "--data", str(mini_tedbench),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed here")
def test_lpips_without_torchvision_says_what_to_install():
    with pytest.raises(ModelError, match="LPIPS needs torchvision"):
        tedbench.lpips_scorer()


def test_clip_score_is_100_times_the_clipped_cosine_of_the_projected_embeddings(tiny_clip_dir):
    """Through torchmetrics (with the transformers-5 workaround) the score keeps its definition
    (Hessel et al. 2021, w = 100)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    images = [make_photo((64, 64), seed=s) for s in range(3)]
    text = "a photo of a red dog"
    scores = clip_scorer(str(tiny_clip_dir))(images, text)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        out = model(**processor(text=[text], images=images, return_tensors="pt", padding=True))
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert scores == pytest.approx((100 * cosine.clamp(min=0)).tolist(), abs=1e-3)


def test_tedbench_takes_every_photo_family_and_refuses_the_shapes_models():
    from types import SimpleNamespace

    from imagic.backends import PHOTO_FAMILIES, require_family

    for family in ("stable-diffusion", "sdxl", "sd3", "flux", "deepfloyd-if"):
        require_family(SimpleNamespace(family=family, identity={}), PHOTO_FAMILIES, "TEdBench")
    shapes = SimpleNamespace(family="pixel-cascade", identity={"source": "imagic:shapes-32"})
    with pytest.raises(InputError, match="needs a stable-diffusion, sdxl, sd3, flux or "
                                         "deepfloyd-if model; imagic:shapes-32 is pixel-cascade"):
        require_family(shapes, PHOTO_FAMILIES, "TEdBench")


def test_a_pair_that_fails_is_recorded_and_the_run_goes_on(tmp_path, mini_tedbench,
                                                           tiny_model_dir, tiny_clip_dir,
                                                           monkeypatch):
    """TEdBench runs through the batch runner: a (pair, seed) that fails goes to
    failures.jsonl with a warning, the others are scored, and a re-run does only that one."""
    from dataclasses import replace

    from imagic.backends import load_backend
    from imagic.presets import get_preset

    backend = load_backend(str(tiny_model_dir), device="cpu")
    config = replace(get_preset("paper"), embed_steps=2, finetune_steps=2, sample_steps=2)
    metrics = Metrics(clip_scorer(str(tiny_clip_dir)), fidelity_scorer())
    out = tmp_path / "out"
    real = tedbench.run_pair

    def fails_on_pair_0(backend, pair, *args, **kwargs):
        if pair.index == 0:
            raise RuntimeError("out of luck")
        return real(backend, pair, *args, **kwargs)

    monkeypatch.setattr(tedbench, "run_pair", fails_on_pair_0)
    with pytest.warns(UserWarning, match="1 \\(pair, seed\\) failed"):
        path = run(backend, mini_tedbench, out, config, metrics, etas=[1.0], limit=2,
                   quiet=True)
    assert {int(r["pair"]) for r in csv.DictReader(path.open())} == {1}
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["id"] == "000-dog-seed0" and "out of luck" in failure["error"]
    monkeypatch.setattr(tedbench, "run_pair", real)
    run(backend, mini_tedbench, out, config, metrics, etas=[1.0], limit=2, quiet=True)
    assert [int(r["pair"]) for r in csv.DictReader(path.open())] == [1, 0]


def test_a_tedbench_folder_reads_as_batch_jobs_named_as_the_benchmark_names_its_pairs(
        mini_tedbench):
    from imagic.batch import read_jobs

    jobs, problems = read_jobs(mini_tedbench)
    pairs = read_pairs(mini_tedbench)
    assert problems == []
    assert [(j.id, j.image, j.text) for j in jobs] == [(p.slug, p.path, p.text) for p in pairs]
