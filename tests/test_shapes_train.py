"""The ShapesWorld model, its trainer and its evaluation, on a tiny model: files are written,
the export loads and samples, a resumed run equals an uninterrupted one, and accuracy is scored."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from imagic.cli.shapes import register as add_cli
from imagic.errors import InputError
from imagic.shapes import COLOURS, POSITIONS, SHAPES, SIZES, TEMPLATES, VOCABULARY
from imagic.shapes.model import ModelConfig, build_model, longest_caption_tokens, parameter_count
from imagic.shapes.train import ShapesStream, TrainConfig, Trainer, train

TINY = ModelConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=2,
                   text_hidden_size=16, text_heads=2)


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(out=str(out), steps=4, batch_size=2, log_every=1, checkpoint_every=2,
                sample_every=2, sample_steps=2, model=TINY, quiet=True, device="cpu")
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds overhead (and stalls when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps in one go; its checkpoint, samples and export are what the tests look at."""
    out = tmp_path_factory.mktemp("shapes") / "straight"
    train(tiny_config(out))
    return out


def test_default_model_is_small_and_the_tokenizer_knows_every_word():
    unet, text_encoder, tokenizer, scheduler = build_model()
    n_unet, n_text = parameter_count(unet), parameter_count(text_encoder)
    assert 1.5e6 <= n_unet <= 3e6
    assert (n_unet + n_text) * 4 <= 20e6  # fp32 safetensors
    assert scheduler.config.prediction_type == "epsilon"
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    unk = tokenizer.unk_token_id
    for word in VOCABULARY:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3 and ids[1] != unk, (word, tokenizer.convert_ids_to_tokens(ids))
    assert longest_caption_tokens(tokenizer) <= tokenizer.model_max_length
    for template, (shape, colour, size, position) in itertools.product(
        TEMPLATES, itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)
    ):
        text = template.format(shape=shape, colour=colour, size=size, position=position)
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 and unk not in ids[1:-1], text


def test_data_stream_is_the_same_with_any_number_of_workers():
    def batches(workers):
        stream = ShapesStream(seed=3, start=5, end=9, batch_size=2, dropout=0.5, timesteps=1000)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return list(loader)

    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["captions"] == b["captions"]
        for key in ("images", "timesteps", "noise"):
            assert torch.equal(a[key], b[key])
    assert not torch.equal(one[0]["noise"], one[1]["noise"])


def test_training_writes_log_samples_checkpoint_and_a_loadable_export(straight_run):
    from imagic.backends.cascade import load_pixel_model

    out = straight_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert all(row["loss"] > 0 and row["samples_per_s"] > 0 for row in log)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_000002.png", "step_000004.png"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 8
    for name in ("unet", "text_encoder", "ema", "optimizer"):
        assert (out / "checkpoint" / f"{name}.safetensors").is_file()

    model = out / "model"
    meta = json.loads((model / "imagic_model.json").read_text())
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta["name"] == "shapes-32"
    assert meta["revision"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert meta["training"]["steps"] == 4 and meta["training"]["batch_size"] == 2
    # the export holds the EMA weights, not the raw ones
    ema = load_file(out / "checkpoint" / "ema.safetensors")
    exported = load_file(weights)
    assert all(torch.equal(exported[k], ema[f"unet.{k}"]) for k in exported)

    backend = load_pixel_model(model, torch.device("cpu"), torch.float32)
    assert backend.identity["revision"] == meta["revision"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images = backend.sample(backend.encode_text(["a small red circle at the top", "a"]),
                            backend.encode_text([""]), gens, steps=2, guidance=3.0)
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def test_resume_continues_exactly_where_the_checkpoint_left_off(straight_run, tmp_path):
    out = tmp_path / "resumed"
    train(tiny_config(out, steps=2))
    saved = load_file(out / "checkpoint" / "unet.safetensors")

    trainer = Trainer(tiny_config(out, resume=True))
    trainer.load_checkpoint(out / "checkpoint")
    assert trainer.step == 2
    assert all(torch.equal(v, saved[k]) for k, v in trainer.unet.state_dict().items())
    with pytest.raises(InputError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", resume=True))

    with pytest.raises(InputError, match="--resume"):
        train(tiny_config(out))  # never silently overwrite a run
    with (out / "train_log.jsonl").open("a") as log:  # it ran on past its checkpoint, then died
        log.write('{"step": 3, "loss": 9.0}\n')
    train(tiny_config(out, resume=True))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    for name in ("unet", "text_encoder", "ema"):
        resumed = load_file(out / "checkpoint" / f"{name}.safetensors")
        straight = load_file(straight_run / "checkpoint" / f"{name}.safetensors")
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in resumed), name


def test_accuracy_report_on_a_handful_of_samples(straight_run, tmp_path):
    from imagic.cli.shapes import cmd_eval_shapes
    from imagic.shapes.evaluate import markdown_table, text_to_image_accuracy

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval-shapes", "--model", str(straight_run / "model"),
                              "--samples", "3", "--steps", "2", "--batch", "2", "--device", "cpu",
                              "--json", str(tmp_path / "eval.json"), "--quiet"])
    assert args.func is cmd_eval_shapes and args.func(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["accuracy"]) == {"shape", "colour", "size", "position"}
    assert all(0.0 <= v <= 1.0 for v in [*result["accuracy"].values(), result["all_correct"]])
    assert sum(result["status"].values()) == 3 and len(result["rows"]) == 3
    assert isinstance(result["meets_bar"], bool)
    assert "all four" in markdown_table(result)

    from imagic.backends.cascade import load_pixel_model

    backend = load_pixel_model(straight_run / "model", torch.device("cpu"), torch.float32)
    again = text_to_image_accuracy(backend, samples=3, steps=2, batch=3, progress=False)
    assert again["accuracy"] == result["accuracy"]  # batching never changes a sample


def test_train_command_line():
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-shapes", "--out", "x", "--steps", "10", "--device", "cpu",
                              "--max-minutes", "0.5", "--resume"])
    assert (args.out, args.steps, args.max_minutes, args.resume) == ("x", 10, 0.5, True)
    assert callable(args.func)


def test_min_snr_weighting_scales_each_samples_loss_by_min_snr_gamma_over_snr(tmp_path):
    from imagic.shapes.train import batch_for_step

    trainer = Trainer(tiny_config(tmp_path / "a", snr_gamma=5.0))
    batch = batch_for_step(0, 0, 8, 0.0, 1000)
    with torch.no_grad():
        losses, t = trainer.sample_losses(batch)
    snr = trainer.alphas[t] / (1 - trainer.alphas[t])
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.equal(trainer.loss_weights(t), weights)
    assert (weights < 1).any() and (weights == 1).any()  # clean timesteps weigh less
    assert float(trainer.train_step(batch)) == pytest.approx(float((losses * weights).mean()),
                                                              rel=1e-5)
    plain = Trainer(tiny_config(tmp_path / "b", snr_gamma=None))
    assert torch.equal(plain.loss_weights(t), torch.ones(8))


def test_defaults_are_the_shipped_models_recipe_and_snr_gamma_0_turns_it_off(monkeypatch):
    """Min-SNR-5 and lr 1e-3 at batch 256 made the shipped model (docs/models/shapes.md);
    other batch sizes get the learning rate scaled by √(batch / 256)."""
    from imagic.cli import main
    from imagic.shapes import train as train_module

    assert TrainConfig().snr_gamma == 5.0
    assert Trainer(tiny_config("unused", batch_size=256)).lr == pytest.approx(1e-3)
    assert Trainer(tiny_config("unused", batch_size=64)).lr == pytest.approx(5e-4)
    assert Trainer(tiny_config("unused", lr=2e-4)).lr == 2e-4
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config: seen.setdefault("config", config))
    assert main(["train-shapes", "--out", "x"]) == 0
    assert seen.pop("config").snr_gamma == 5.0
    assert main(["train-shapes", "--out", "x", "--snr-gamma", "0"]) == 0
    assert seen.pop("config").snr_gamma is None


def test_snr_gamma_must_not_be_negative(capsys):
    from imagic.cli import main

    assert main(["train-shapes", "--out", "x", "--snr-gamma", "-1"]) == 2
    assert "--snr-gamma must be 0 (off) or a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train-shapes", "--out", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train-shapes", "--out", "x", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train-shapes", "--out", "x", "--workers", "-1"], "--workers must be 0 or more"),
    (["train-shapes", "--out", "x", "--lr", "0"], "--lr must be a positive number"),
    (["train-shapes", "--out", "{file}"], "is a file"),
    (["train-shapes", "--out", "x", "--init-from", "missing"], "not an exported"),
    (["eval-shapes", "--samples", "0"], "--samples must be at least 1"),
    (["eval-shapes", "--json", "no/such/folder/r.json"], "--json"),
    (["bench", "shapes", "--strengths", "0.5,1.5", "--out", "b"], "(0, 1]"),
])
def test_bad_numbers_and_paths_are_one_line_before_any_work(tmp_path, capsys, monkeypatch,
                                                           args, message):
    from imagic.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    args = [a.format(file="a-file") for a in args]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing made


def test_the_shapes_commands_refuse_a_photo_model_and_say_what_is_missing(
        tmp_path, capsys, monkeypatch, tiny_model_dir):
    import importlib.util

    from imagic.cli import main

    for args in (["bench", "shapes", "--model", str(tiny_model_dir), "--cases", "1",
                  "--out", str(tmp_path / "b")],
                 ["eval-shapes", "--model", str(tiny_model_dir), "--samples", "1"]):
        assert main(args) == 2
        assert "needs a pixel-cascade model" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "shapes", "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'imagic[bench]'" in capsys.readouterr().err
