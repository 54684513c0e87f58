"""The embedded ShapesWorld model: it ships in the package, loads offline, draws what captions
ask for, and `imagic edit` with no --model edits with it."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagic import Imagic, get_preset, load_backend
from imagic.backends.cascade import EMBEDDED_MODELS
from imagic.cli import main
from imagic.images import load_image
from imagic.shapes import detect
from imagic.shapes.evaluate import text_to_image_accuracy

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "large-red-circle-top-left.png"


@pytest.fixture(scope="module")
def backend():
    return load_backend(None)


def test_embedded_model_ships_small_and_loads_as_the_default(backend):
    folder = EMBEDDED_MODELS["imagic:shapes-32"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20e6
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    assert backend.family == "pixel-cascade" and backend.resolution == 32
    assert backend.default_preset == "shapes" and backend.identity["source"] == "imagic:shapes-32"


def test_captions_give_the_asked_shape_colour_size_and_position(backend):
    """Twelve random captions, fixed seeds: the detectors read back what the text asked
    (docs/models/shapes.md has the 500-caption figures)."""
    result = text_to_image_accuracy(backend, samples=12, seed=1, steps=25, progress=False)
    for attribute in ("shape", "colour", "size", "position"):
        assert result["accuracy"][attribute] >= 11 / 12, result["accuracy"]


def test_a_short_edit_changes_the_colour_and_keeps_the_rest(backend):
    config = replace(get_preset("shapes"), embed_steps=40, finetune_steps=60, seeds=(1,),
                     etas=(0.0, 1.0), sample_steps=25)
    editor = Imagic(backend, config, quiet=True)
    session = editor.fit(load_image(EXAMPLE),
                         "a large blue circle at the top left")
    found = {r.eta: detect(np.asarray(r.image)) for r in editor.generate(session)}
    assert found[0.0].colour == "red"  # η = 0 reconstructs the input's colour
    assert found[1.0].attributes == {"shape": "circle", "colour": "blue", "size": "large",
                                     "position": "top left"}
    # the paper's stage 3, from fresh noise, makes the same edit
    noise = editor.generate(session, etas=[1.0], start="noise")
    assert detect(np.asarray(noise[0].image)).attributes == found[1.0].attributes


def test_inversion_gives_the_input_back(backend):
    """DDIM run backwards from a render and forwards again at its caption (no guidance) comes
    back close to it, what `start="inversion"` builds on; fresh noise at the same caption gives
    another picture of the same scene description."""
    from imagic.shapes import sample_scene
    from imagic.shapes.evaluate import check_edit
    from imagic.shapes.world import caption, render

    scene = sample_scene(7)
    image = Image.fromarray(render(scene))
    cond, uncond = backend.encode_text([caption(scene.attributes)]), backend.encode_text([""])
    x_t = backend.invert(backend.encode_image(image), cond, 25)
    assert 0.5 < x_t.std().item() < 1.5  # noise-like, not the image
    back = check_edit(backend.sample(cond, uncond, [torch.Generator()], 25, 1.0,
                                     x_start=x_t)[0], scene, {})
    fresh = check_edit(backend.sample(cond, uncond, [torch.Generator().manual_seed(0)], 25,
                                      1.0)[0], scene, {})
    assert back["kept"] and back["pebbles_added"] == 0 and back["background_psnr"] > 28, back
    assert back["background_psnr"] > fresh["background_psnr"] + 5, fresh


def test_edit_without_model_uses_the_embedded_one_and_its_session_rerenders(tmp_path):
    out = tmp_path / "out"
    code = main(["edit", str(EXAMPLE), "a large blue circle at the top left", "--out", str(out),
                 "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "3",
                 "--eta", "1", "--seeds", "0", "--quiet"])
    assert code == 0
    assert (out / "eta1.00_seed0.png").exists() and (out / "grid.png").exists()
    session = (out / "session" / "manifest.json").read_text()
    assert '"imagic:shapes-32"' in session and '"embed_lr": 0.025' in session  # the shapes preset
    # the saved edit re-renders with no --model: the session names the embedded model
    again = tmp_path / "again"
    assert main(["generate", str(out / "session"), "--eta", "1", "--seeds", "0", "--out",
                 str(again), "--quiet"]) == 0
    assert (again / "eta1.00_seed0.png").read_bytes() == (out / "eta1.00_seed0.png").read_bytes()


def test_score_edit_reads_an_edit_of_a_shipped_example_back(tmp_path, capsys):
    """`imagic bench score-edit OUT` scores each output of an edit of examples/ against the
    example's known scene; anything else is one line, exit 2."""
    out = tmp_path / "out"
    assert main(["edit", str(EXAMPLE), "a large blue circle at the top left", "--out", str(out),
                 "--embed-steps", "2", "--finetune-steps", "2", "--sample-steps", "3",
                 "--eta", "0,1", "--no-session", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", "score-edit", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("large-red-circle-top-left: 'a large blue circle at the top "
                                 "left' asks for {'colour': 'blue'}")
    assert [line.split(":")[0].strip() for line in printed[1:3]] == ["η 0.00 seed 0",
                                                                     "η 1.00 seed 0"]
    assert printed[-1].startswith("target read ") and "/2;" in printed[-1]
    assert main(["bench", "score-edit", str(tmp_path)]) == 2
    assert "not the output folder of `imagic edit`" in capsys.readouterr().err
