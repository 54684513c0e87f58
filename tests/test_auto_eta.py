"""Automatic η: the rule on numbers, and `--eta auto` end to end on a tiny model."""

import json

import pytest
import torch
from PIL import Image

from imagic.auto_eta import AUTO_ETAS, FRACTION, AutoChoice, choose, choose_strategy
from imagic.cli import main
from imagic.errors import ModelError


def test_rule_takes_the_later_of_reaching_the_text_and_the_structure_changing():
    etas = [0.4, 0.6, 0.8, 1.0, 1.2]
    # the margin rises from 0 to 1; 0.8 is the first η past FRACTION of it
    margins = [0.0, 0.1, 0.8, 0.9, 1.0]
    assert 0.1 < FRACTION <= 0.8
    # 1 − SSIM steps up most at 0.8 too: 0.8
    assert choose(etas, margins, [0.1, 0.1, 0.4, 0.45, 0.5]) == 0.8
    # the structure changes later (at 1.0): the edit is not made before it, so 1.0
    assert choose(etas, margins, [0.1, 0.12, 0.14, 0.5, 0.52]) == 1.0
    # the structure changes earlier (at 0.6): the text is not reached before 0.8, so 0.8
    assert choose(etas, margins, [0.1, 0.5, 0.52, 0.54, 0.56]) == 0.8
    # only the differences of the margins matter, not their offset or scale
    assert choose(etas, [5 + 3 * m for m in margins], [0.1, 0.1, 0.4, 0.45, 0.5]) == 0.8
    # a margin that peaks early while the picture changes at 0.8 (ShapesBench's shape edits)
    assert choose(etas, [0.0, 0.9, 1.0, 0.6, 0.7], [0.3, 0.3, 0.38, 0.38, 0.37]) == 0.8
    # one η: that one
    assert choose([0.7], [0.3], [0.2]) == 0.7
    # a broken model (NaN) is an error, not a silent pick
    with pytest.raises(ModelError, match="not finite"):
        choose(etas, [0.0, float("nan"), 0.1, 0.2, 0.3], [0.1] * 5)


def test_edit_with_eta_auto_writes_the_chosen_image_per_seed(tmp_path, tiny_model_dir,
                                                              photo_path):
    out = tmp_path / "out"
    assert main(["edit", str(photo_path), "a photo of a red dog", "--model", str(tiny_model_dir),
                 "--eta", "auto", "--seeds", "0,1", "--embed-steps", "2",
                 "--finetune-steps", "2", "--sample-steps", "2", "--out", str(out),
                 "--no-session", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["etas"] == list(AUTO_ETAS)
    picks = {c["seed"]: c for c in manifest["auto_eta"]}
    assert sorted(picks) == [0, 1]
    for seed, pick in picks.items():
        assert pick["etas"] == list(AUTO_ETAS)
        assert len(pick["margins"]) == len(pick["distances"]) == len(AUTO_ETAS)
        assert pick["eta"] == choose(pick["etas"], pick["margins"], pick["distances"])
        chosen = Image.open(out / f"auto_seed{seed}.png")
        swept = Image.open(out / f"eta{pick['eta']:.2f}_seed{seed}.png")
        assert chosen.tobytes() == swept.tobytes()
    assert (out / "grid.png").exists()


def test_generate_from_a_session_with_eta_auto(tmp_path, tiny_model_dir, photo_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["edit", str(photo_path), "a photo of a red dog", "--model", str(tiny_model_dir),
                 "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "2",
                 "--eta", "0.5", "--out", str(first), "--quiet"]) == 0
    assert main(["generate", str(first / "session"), "--eta", "auto", "--sample-steps", "2",
                 "--out", str(second), "--quiet"]) == 0
    manifest = json.loads((second / "manifest.json").read_text())
    [pick] = manifest["auto_eta"]
    assert pick["seed"] == 0 and pick["etas"] == list(AUTO_ETAS)
    assert pick["eta"] == choose(pick["etas"], pick["margins"], pick["distances"])
    chosen = Image.open(second / "auto_seed0.png")
    assert chosen.tobytes() == Image.open(second / f"eta{pick['eta']:.2f}_seed0.png").tobytes()


def sweep(forget, margins, distances):
    etas = [0.4, 0.8, 1.2]
    return AutoChoice(0, choose(etas, margins, distances), etas, margins, distances, forget)


def test_forgetting_is_picked_only_where_the_edit_needs_it():
    # sweeps come least forgetting first; the first whose pick reads as the text (m > 0) wins
    plain = sweep("none", [-0.2, 0.3, 0.4], [0.1, 0.3, 0.35])
    strong = sweep("noencoder", [0.1, 1.0, 1.1], [0.2, 0.5, 0.6])
    assert (plain.eta, strong.eta) == (0.8, 0.8)
    picked = choose_strategy([plain, strong])
    assert picked is plain and picked.others == [strong]
    # without forgetting the image still reads as the input (m < 0): forget, but no more
    # than needed
    weak = sweep("none", [-0.5, -0.3, -0.2], [0.1, 0.12, 0.3])
    mild = sweep("encoderkv", [-0.4, 0.2, 0.3], [0.1, 0.3, 0.35])
    assert choose_strategy([weak, mild, strong]) is mild
    # one sweep (forget not "auto"): the η rule alone
    assert choose_strategy([weak]) is weak and weak.others == []
    # no pick reads as the text: the most aligned pick
    a = sweep("none", [-0.9, -0.5, -0.2], [0.1, 0.4, 0.5])
    b = sweep("decoderattn", [-0.9, -0.1, -0.3], [0.1, 0.3, 0.35])
    assert choose_strategy([a, b]).forget == "decoderattn"
    assert AutoChoice.from_dict(picked.to_dict()) == picked


def test_auto_candidates_go_from_least_to_most_forgetting():
    from imagic.backends.base import Delta
    from imagic.forgetting import candidates, reverted_elements

    names = {"down_blocks.0.resnets.0.conv1.weight": 10, "down_blocks.0.attentions.0."
             "transformer_blocks.0.attn2.to_k.weight": 3, "up_blocks.1.resnets.0.conv1.weight": 4,
             "mid_block.resnets.0.conv1.weight": 5}
    delta = Delta("full", {k: torch.zeros(n) for k, n in names.items()})
    assert reverted_elements(delta, "noencoder") == 13
    assert reverted_elements(delta, "encoderkv") == 10
    assert reverted_elements(delta, "decoderattn") == 4
    assert candidates(delta) == ["none", "decoderattn", "encoderkv", "noencoder"]
    lora = Delta("lora", {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B."
                          "weight": torch.zeros(4, 2)}, lora_rank=2)
    assert candidates(lora) == ["none", "encoderkv", "noencoder"]  # attn strategies keep it


def test_forgetting_auto_renders_each_strategy_and_the_pick_is_one_of_them(tmp_path,
                                                                          tiny_model_dir,
                                                                          photo_path):
    """The API on a one-η sweep (the CLI's --eta auto sweeps 9 η per strategy), then the CLI."""
    from imagic import EditConfig, Imagic, load_backend
    from imagic.auto_eta import choose_etas
    from imagic.forgetting import candidates
    from imagic.images import load_image
    from imagic.outputs import write_outputs

    backend = load_backend(str(tiny_model_dir))
    config = EditConfig(embed_steps=2, finetune_steps=2, finetune_lr=2e-3, sample_steps=2)
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(load_image(photo_path), "a photo of a red dog")
    results = editor.generate(session, etas=[0.8], seeds=[0], forget="auto")
    strategies = candidates(session.delta)
    assert sorted(strategies) == ["decoderattn", "encoderkv", "noencoder", "none"]  # full
    assert [(r.forget, r.eta) for r in results] == [(s, 0.8) for s in strategies]
    choices = choose_etas(backend, session, results)
    pick = choices[0]
    assert sorted([pick.forget, *(c.forget for c in pick.others)]) == sorted(strategies)
    out = tmp_path / "out"
    write_outputs(out, session, results, [0.8], [0], {"command": "test"}, choices)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["auto_eta"][0]["forget"] == pick.forget
    assert len([f for f in manifest["images"] if not f.get("auto")]) == 4
    same = Image.open(out / f"eta{pick.eta:.2f}_seed0_forget-{pick.forget}.png")
    assert Image.open(out / "auto_seed0.png").tobytes() == same.tobytes()
    one = tmp_path / "one"  # the same, one strategy: one row fewer per strategy left out
    write_outputs(one, session, results[:1], [0.8], [0], {"command": "test"})
    cell = same.width * max(1, 128 // same.width)  # small images are enlarged in the grid
    rows_added = Image.open(out / "grid.png").height - Image.open(one / "grid.png").height
    assert rows_added == 3 * (cell + 4)
    # the CLI renders every strategy from a saved session without training
    session.save(tmp_path / "session")
    assert main(["generate", str(tmp_path / "session"), "--forget", "auto", "--eta", "1",
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    written = json.loads((tmp_path / "cli" / "manifest.json").read_text())["images"]
    assert sorted(f["forget"] for f in written) == sorted(strategies)
