"""The web page's work without a browser: `imagic.ui.studio` (edits, re-renders, cancel, the
sessions folder) on the embedded model with a few steps, and the page's parsing. The page itself
is driven in a real browser by test_ui_browser.py."""

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio", reason="imagic ui needs gradio (pip install gradio)")

import imagic.editor  # noqa: E402
from imagic import InputError, SessionError, load_backend  # noqa: E402
from imagic.cli import main  # noqa: E402
from imagic.cli.ui import is_loopback  # noqa: E402
from imagic.session import EditSession  # noqa: E402
from imagic.ui import Studio  # noqa: E402
from imagic.ui.page import error, recipe_options, shipped_examples  # noqa: E402
from imagic.ui.studio import Cancelled  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "large-red-circle-top-left.png"
TEXT = "a large blue circle at the top left"
FEW = {"embed_steps": 2, "finetune_steps": 2, "sample_steps": 4, "etas": (0.9, 1.1)}


@pytest.fixture(scope="module")
def backend():
    return load_backend(None)


@pytest.fixture(scope="module")
def edited(backend, tmp_path_factory):
    """One edit with a few steps, made once for the tests that render from it."""
    studio = Studio(backend, tmp_path_factory.mktemp("sessions"))
    render = studio.edit(studio.check_edit(EXAMPLE, TEXT, None, FEW))
    return studio, render


@pytest.fixture
def count_training(monkeypatch):
    """Counts the engine's optimizer loops (stage 1 and stage 2 each run one)."""
    calls = []
    train = imagic.editor.train

    def counted(*args, **kwargs):
        calls.append(kwargs.get("label"))
        return train(*args, **kwargs)

    monkeypatch.setattr(imagic.editor, "train", counted)
    return calls


def test_an_edit_is_saved_as_the_command_line_lays_out_an_output_folder(edited):
    studio, render = edited
    entry = studio.sessions_dir / render.name
    assert [s.caption for s in render.images] == ["η 0.9 · seed 0", "η 1.1 · seed 0"]
    assert all(s.file.parent == entry and s.file.is_file() for s in render.images)
    assert render.grid == entry / "grid.png" and render.grid.is_file()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["text"] == TEXT and manifest["config"]["etas"] == [0.9, 1.1]
    # the session reloads (imagic generate ENTRY/session works), and the zip holds it whole
    EditSession.load(entry / "session").check_model(studio.backend)
    with zipfile.ZipFile(render.session_zip) as archive:
        assert sorted(archive.namelist()) == [
            "session/delta.safetensors", "session/embeddings.safetensors",
            "session/input.png", "session/manifest.json"]
    assert render.chosen == render.images[-1]  # no auto-η: the download takes the last one


def test_a_rerender_trains_nothing_and_adds_eta_to_the_gallery_and_grid(edited, count_training):
    studio, render = edited
    again = studio.render(render.name, 0.75, [0])
    assert count_training == []  # stage 3 only: no optimizer step
    assert [s.eta for s in again.images] == [0.75, 0.9, 1.1]
    assert again.etas == [0.75, 0.9, 1.1]
    manifest = json.loads((studio.sessions_dir / render.name / "manifest.json").read_text())
    assert manifest["command"] == "generate" and manifest["config"]["etas"] == [0.75, 0.9, 1.1]
    assert (studio.sessions_dir / render.name / "eta0.75_seed0.png").is_file()


def test_an_edit_runs_both_training_stages_once(backend, tmp_path, count_training):
    studio = Studio(backend, tmp_path)
    studio.edit(studio.check_edit(EXAMPLE, TEXT, None, {**FEW, "etas": (1.0,)}))
    assert count_training == ["stage 1/3 embedding", "stage 2/3 fine-tune"]


def test_a_reopened_session_keeps_rendering_after_a_restart(edited, count_training):
    studio, render = edited
    restarted = Studio(studio.backend, studio.sessions_dir)  # a new process: nothing in memory
    entry = next(e for e in restarted.entries() if e.name == render.name)
    assert (entry.text, entry.model, entry.broken) == (TEXT, "imagic:shapes-32", None)
    assert entry.input_image.is_file()
    opened = restarted.open(render.name)
    assert [s.eta for s in opened.images] == studio.open(render.name).etas
    more = restarted.render(render.name, 1.2, [0])
    assert 1.2 in more.etas and count_training == []


def test_auto_eta_marks_its_pick_and_the_download_takes_it(backend, tmp_path):
    """With a forgetting strategy too: the session keeps it, and auto-η picks among its
    images."""
    studio = Studio(backend, tmp_path)
    request = studio.check_edit(EXAMPLE, TEXT, None, {**FEW, "etas": "auto",
                                                      "forget": "noencoder"})
    render = studio.edit(request)
    picks = [s for s in render.images if s.auto]
    assert len(picks) == 1 and picks[0].caption.endswith("auto pick")
    assert render.chosen == picks[0]
    assert (studio.sessions_dir / render.name / "auto_seed0.png").is_file()
    manifest = json.loads((studio.sessions_dir / render.name / "manifest.json").read_text())
    assert manifest["config"]["forget"] == "noencoder"
    assert len(studio.render(render.name, 0.35, [0]).images) == len(render.images) + 1
    # forget "auto" (a sweep per strategy) is the command line's: refused in one line
    with pytest.raises(InputError, match="forget auto renders"):
        studio.check_edit(EXAMPLE, TEXT, None, {**FEW, "forget": "auto"})


def test_the_cli_lines_for_a_bad_upload_text_and_recipe(backend, tmp_path):
    studio = Studio(backend, tmp_path / "sessions")
    upload = tmp_path / "gradio-tmp" / "notes.txt"
    upload.parent.mkdir()
    upload.write_text("not an image")
    with pytest.raises(InputError) as bad:
        studio.check_edit(upload, TEXT, None, {})
    line = error(bad.value, str(upload))  # the page names the file, not gradio's temp path
    assert line == "**error:** notes.txt is not an image Pillow can read"
    with pytest.raises(InputError, match="the target text is empty"):
        studio.check_edit(EXAMPLE, " \u200b ", None, {})
    with pytest.raises(InputError, match="--finetune-lr is the full fine-tune's rate"):
        studio.check_edit(EXAMPLE, TEXT, None, {"finetune": "lora", "finetune_lr": 1e-5})
    with pytest.raises(InputError, match="upload an image"):
        studio.check_edit(None, TEXT, None, {})
    assert list((tmp_path / "sessions").iterdir()) == []


def test_the_form_passes_only_what_differs_from_the_preset(backend, tmp_path):
    studio = Studio(backend, tmp_path)
    preset = studio.preset_values("shapes")
    form = {"embed_steps": float(preset.embed_steps), "guidance": preset.guidance,
            "finetune": preset.finetune, "lora_lr": None}
    assert recipe_options("shapes", "0.8,0.9,1,1.1,1.2", "0", form, studio) == {}
    form |= {"embed_steps": 7.0, "finetune": "lora"}
    assert recipe_options("shapes", "auto", "0:1", form, studio) == {
        "embed_steps": 7, "finetune": "lora", "etas": "auto", "seeds": (0, 1)}
    # Forgedit's forgetting and AID's interpolation are kept in the session, for its re-renders
    form |= {"forget": "noencoder", "interpolation": "attention", "attention_warmup": 0.5}
    options = recipe_options("shapes", "1", "0", form, studio)
    assert options["forget"] == "noencoder" and options["interpolation"] == "attention"
    assert "attention_warmup" not in options  # the preset's own value
    config = studio.check_edit(EXAMPLE, TEXT, None, options).config
    assert (config.forget, config.interpolation) == ("noencoder", "attention")


def test_cancel_stops_training_keeps_the_model_and_writes_nothing(backend, tmp_path):
    studio = Studio(backend, tmp_path)
    weights = {k: v.clone() for u in backend.stage_unets().values()
               for k, v in u.state_dict().items()}
    request = studio.check_edit(EXAMPLE, TEXT, None, {**FEW, "finetune_steps": 100_000})
    job = studio.start("tab", lambda job: studio.edit(request, job))
    while "stage 2" not in studio.progress():  # cancel while stage 2 changes the weights
        assert not job.done.wait(0.05)
    time.sleep(0.3)
    assert studio.cancel("tab")
    assert job.done.wait(60)
    with pytest.raises(Cancelled):
        job.result()
    assert list(tmp_path.iterdir()) == []  # no entry, no hidden half of one
    after = {k: v for u in backend.stage_unets().values() for k, v in u.state_dict().items()}
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)  # the base model is back
    assert not studio.cancel("tab")  # nothing left to cancel


def test_broken_sessions_are_listed_as_broken_with_one_line(edited, tmp_path):
    studio, render = edited
    sessions = tmp_path / "sessions"
    (sessions / "no-session").mkdir(parents=True)
    (sessions / "bad-json" / "session").mkdir(parents=True)
    (sessions / "bad-json" / "session" / "manifest.json").write_text("{not json")
    good = studio.sessions_dir / render.name
    truncated = sessions / "truncated"
    (truncated / "session").mkdir(parents=True)
    for file in (good / "session").iterdir():
        (truncated / "session" / file.name).write_bytes(file.read_bytes())
    delta = truncated / "session" / "delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:1000])
    mine = Studio(studio.backend, sessions)
    listed = {e.name: e.broken for e in mine.entries()}
    assert listed["no-session"] == "no-session holds no session folder"
    assert listed["bad-json"].startswith("bad-json/session/manifest.json is damaged")
    assert listed["truncated"] is None  # its manifest reads; its tensors are read on opening
    with pytest.raises(SessionError, match="delta.safetensors is damaged") as failed:
        mine.open("truncated")
    assert "\n" not in str(failed.value) and str(sessions) not in str(failed.value)
    assert {e.name: e.broken for e in mine.entries()}["truncated"] == str(failed.value)
    for name in ("../outside", ".hidden", "", "no-such"):
        with pytest.raises(SessionError, match="no saved session named"):
            mine.open(name)


def test_imagic_ui_refuses_bad_options_in_one_line(capsys):
    assert main(["ui", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagic: error: unknown preset 'nope'; choose one of: ")
    assert "shapes" in err and err.count("\n") == 1
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


def test_only_loopback_hosts_count_as_this_machine():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "example.org", "::"]))


def test_the_page_offers_the_examples_of_the_model_s_world(backend):
    """The 32 px model gets ShapesWorld's examples; a 128 px ShapesWorld 2 cascade gets its own,
    each with the text of its edit (the cat that sits, the object removed, the one added)."""
    from types import SimpleNamespace

    assert [Path(path).name for path, _ in shipped_examples(backend)] == [
        "large-red-circle-top-left.png", "small-yellow-square-center.png",
        "large-green-triangle-bottom-right.png"]
    cascade = shipped_examples(SimpleNamespace(output_resolution=128))
    assert [(Path(path).name, text) for path, text in cascade] == [
        ("purple-cat-standing.png", "a large purple cat sitting on the right"),
        ("triangle-and-cat.png", "a small purple cat standing on the right"),
        ("green-triangle.png", "a small green triangle on the left and a small red circle on "
                               "the right")]
    assert all(Path(path).is_file() for path, _ in cascade)
