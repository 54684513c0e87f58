"""The web page (Gradio Blocks): parses what the user typed, calls the `Studio`, shows the result.

No check lives here: the image, the text and the recipe are checked by the functions the command
line calls (`load_image`, `check_text`, `EditConfig.with_options`), and their one-line messages
are shown in the status line. Work on the model is queued one event at a time (Gradio's queue,
which shows each tab its place in line) and runs as a `Studio` job that the Cancel button stops.
"""

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..cli import describe_os_error  # noqa: E402
from ..cli.options import parse_eta_or_auto, parse_seeds  # noqa: E402
from ..errors import ImagicError  # noqa: E402
from ..forgetting import STRATEGIES  # noqa: E402
from ..presets import INTERPOLATIONS, PRESETS, SAMPLERS, STARTS  # noqa: E402
from ..shapes.world import EXAMPLES_DIR  # noqa: E402
from .studio import Cancelled, EditRequest, Render, Studio  # noqa: E402

log = logging.getLogger("imagic.ui")

EXAMPLE_TEXTS = {  # a target text for each shipped example
    "large-red-circle-top-left.png": "a large blue circle at the top left",
    "small-yellow-square-center.png": "a small yellow circle at the center",
    "large-green-triangle-bottom-right.png": "a large green square at the bottom right",
}
# the recipe's numbers behind the "Advanced" fold: (EditConfig field, label, whole number)
NUMBERS = (
    ("embed_steps", "stage 1 steps", True),
    ("embed_lr", "stage 1 learning rate", False),
    ("finetune_steps", "stage 2 steps", True),
    ("finetune_lr", "stage 2 learning rate (full)", False),
    ("lora_lr", "stage 2 learning rate (LoRA)", False),
    ("guidance", "guidance", False),
    ("sample_steps", "sampling steps", True),
    ("attention_warmup", "attention interpolation: share of steps", False),
    ("forget_strength", "forgetting strength", False),
)
# the session keeps interpolation and forgetting: its re-renders use them too ("auto" forgetting,
# a sweep per strategy, is the command line's)
CHOICES = (("finetune", "stage 2 trains", ("full", "lora")), ("sampler", "sampler", SAMPLERS),
           ("start", "sampling starts from", STARTS),
           ("interpolation", "interpolation", INTERPOLATIONS),
           ("forget", "forgetting (Forgedit)", tuple(STRATEGIES)))
ADVANCED = [name for name, _, _ in NUMBERS] + [name for name, _, _ in CHOICES]
POLL_S = 0.5  # how often a running job's stage and loss are read for the status line


# --------------------------------------------------------------------------- parsing


def one_line(err: BaseException) -> str:
    """What the command line would print for `err`, without the "imagic: error:" prefix."""
    if isinstance(err, (ImagicError, argparse.ArgumentTypeError)):
        return " ".join(str(err).split())
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, MemoryError):
        return "ran out of memory (RAM); fewer η and seeds at once or a smaller model need less"
    first = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"


def error(err: BaseException, upload: str | None = None) -> str:
    """The status line for an error; the upload's temporary path shown as its file name."""
    message = one_line(err)
    if upload:
        message = message.replace(str(upload), Path(upload).name)
    return f"**error:** {message}"


def recipe_options(preset: str, etas: str, seeds: str, values: dict, studio: Studio) -> dict:
    """EditConfig options from the form: the fields that differ from the preset's (a blank or
    unchanged field keeps the preset's value, as an option left out does on the command line)."""
    base = studio.preset_values(preset)
    options: dict = {}
    for name, value in values.items():
        if value is None or value == "":
            continue
        whole = next((w for n, _, w in NUMBERS if n == name), False)
        value = int(value) if whole and float(value).is_integer() else value
        if value != getattr(base, name):
            options[name] = value
    if etas.strip():
        parsed = parse_eta_or_auto(etas)
        if parsed == "auto" or tuple(parsed) != base.etas:
            options["etas"] = parsed
    if seeds.strip():
        parsed = parse_seeds(seeds)
        if tuple(parsed) != base.seeds:
            options["seeds"] = parsed
    return options


def render_seeds(text: str, render: Render | None) -> list[int]:
    """The seeds field of the re-render row: blank keeps the entry's seeds."""
    if not text.strip():
        return render.seeds if render else []
    return list(parse_seeds(text))


# --------------------------------------------------------------------------- the page


def shipped_examples(backend) -> list[list[str]]:
    """The shipped examples of the model's world, each [image path, target text]: ShapesWorld 2's
    for a 128 px model (each with its own edit), ShapesWorld's otherwise."""
    texts = EXAMPLE_TEXTS
    if backend.output_resolution == 128:
        from ..shapes2.world import EXAMPLES, caption, example_scenes

        texts = {f"{name}.png": caption(example_scenes(name)[1]) for name in EXAMPLES}
    return [[str(EXAMPLES_DIR / name), text] for name, text in texts.items()
            if (EXAMPLES_DIR / name).is_file()]


def build_page(studio: Studio) -> gr.Blocks:
    """The one page of `imagic ui`."""
    examples = shipped_examples(studio.backend)
    base = studio.preset_values(None)

    with gr.Blocks(title="imagic") as page:
        gr.Markdown("# imagic\nEdit one image to match a text (Imagic, Kawar et al. 2023): "
                    "stages 1-2 fit the model to your image, then any η re-renders in seconds. "
                    f"Model: `{studio.model}`.")
        status = gr.Markdown("Upload an image or pick an example, type what it should show, "
                             "press **Edit**.", elem_id="status")
        rendered = gr.State(None)  # the Render on show
        request = gr.State(None)  # an edit checked and waiting for the queue
        listed = gr.State([])  # the entries in the sessions gallery

        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image", type="filepath", elem_id="upload")
                preview = gr.Image(label="input", type="filepath", interactive=False,
                                   height=200, elem_id="preview")
                text = gr.Textbox(label="target text", placeholder="a photo of a sitting dog",
                                  elem_id="text")
                if examples:
                    gr.Examples(examples, inputs=[upload, text], label="examples")
                preset = gr.Dropdown(sorted(PRESETS), value=studio.preset, label="preset",
                                     elem_id="preset")
                with gr.Accordion("advanced", open=False, elem_id="advanced"):
                    etas = gr.Textbox(label="η values (0.6,0.7 or 0.5:1.0:0.1 or auto)",
                                      value=_etas_text(base.etas), elem_id="etas")
                    seeds = gr.Textbox(label="seeds", value=_seeds_text(base.seeds),
                                       elem_id="seeds")
                    fields = {}
                    with gr.Row():
                        for name, label, whole in NUMBERS:
                            fields[name] = gr.Number(getattr(base, name), label=label,
                                                     precision=0 if whole else None,
                                                     elem_id=name.replace("_", "-"), min_width=120)
                    with gr.Row():
                        for name, label, choices in CHOICES:
                            fields[name] = gr.Dropdown(list(choices), value=getattr(base, name),
                                                       label=label, min_width=120,
                                                       elem_id=name.replace("_", "-"))
                with gr.Row():
                    edit = gr.Button("Edit", variant="primary", elem_id="edit")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")

            with gr.Column(scale=2):
                gallery = gr.Gallery(label="edits", columns=6, height=260, format="png",
                                     object_fit="contain", fit_columns=False, elem_id="gallery")
                with gr.Row():
                    eta = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="η (re-render)",
                                    elem_id="eta", scale=3)
                    again_seeds = gr.Textbox(label="seeds", elem_id="render-seeds", scale=1)
                    again = gr.Button("Render η", elem_id="render", scale=1)
                grid = gr.Image(label="grid", type="filepath", interactive=False, format="png",
                                elem_id="grid")
                with gr.Row():
                    get_image = gr.DownloadButton("chosen image", interactive=False,
                                                  elem_id="download-image")
                    get_grid = gr.DownloadButton("grid", interactive=False,
                                                 elem_id="download-grid")
                    get_zip = gr.DownloadButton("session (.zip)", interactive=False,
                                                elem_id="download-session")
                info = gr.Markdown(elem_id="info")

        gr.Markdown("## saved sessions\nClick one to reopen it and keep rendering.")
        sessions = gr.Gallery(label="saved sessions", columns=8, height=220, fit_columns=False,
                              allow_preview=False, object_fit="contain", elem_id="sessions")
        refresh = gr.Button("refresh the list", size="sm")

        shown = [status, gallery, grid, get_image, get_grid, get_zip, eta, again_seeds, info,
                 rendered]
        listing = [sessions, listed]

        # ------------------------------------------------------------- handlers

        def on_upload(path: str | None):
            if not path:
                return None, gr.skip()
            try:
                studio.check_image(path)
            except ImagicError as err:
                return None, error(err, path)
            return path, f"ready: {Path(path).name}"

        def on_preset(name: str):
            values = studio.preset_values(name)
            return [_etas_text(values.etas), _seeds_text(values.seeds),
                    *[getattr(values, n) for n in ADVANCED]]

        def check(path, target, preset_name, eta_text, seed_text, *numbers):
            try:
                values = dict(zip(ADVANCED, numbers))
                options = recipe_options(preset_name, eta_text, seed_text, values, studio)
                checked = studio.check_edit(path, target, preset_name, options)
            except (ImagicError, argparse.ArgumentTypeError) as err:
                return error(err, path), None
            notes = "".join(f"  \nwarning: {w}" for w in checked.warnings)
            return "queued: waiting for the model" + notes, checked

        def run_edit(checked: EditRequest | None, req: gr.Request,
                     progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's way
            if checked is None:
                yield _skip(shown + listing)
                return
            job = studio.start(req.session_hash, lambda job: studio.edit(checked, job))
            yield from _follow(studio, job, shown, listing, status, "edited")

        def run_render(current: Render | None, value: float, seed_text: str, req: gr.Request,
                       progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            if current is None:
                yield {status: "edit an image or open a saved session first"}
                return
            try:
                chosen = render_seeds(seed_text, current)
            except argparse.ArgumentTypeError as err:
                yield {status: error(err)}
                return
            name = current.name
            job = studio.start(req.session_hash,
                               lambda job: studio.render(name, value, chosen, job))
            yield from _follow(studio, job, shown, listing, status, "rendered")

        def run_open(entries: list, evt: gr.SelectData, req: gr.Request):
            entry = entries[evt.index]
            if entry.broken:
                yield {status: f"**broken:** {entry.name}: {entry.broken}"}
                return
            job = studio.start(req.session_hash, lambda job: studio.open(entry.name))
            yield from _follow(studio, job, shown, listing, status, "opened")

        def stop(req: gr.Request):
            if studio.cancel(req.session_hash):
                return "cancelled: nothing of it was saved"
            return "nothing to cancel"

        def pick(current: Render | None, evt: gr.SelectData):
            if current is None or evt.index >= len(current.images):
                return gr.skip()
            return gr.DownloadButton(value=str(current.images[evt.index].file),
                                     interactive=True)

        # ------------------------------------------------------------- events

        upload.change(on_upload, [upload], [preview, status], queue=False)
        preset.input(on_preset, [preset], [etas, seeds, *fields.values()], queue=False)
        device = dict(concurrency_limit=1, concurrency_id="device", show_progress_on=[gallery])
        edited = edit.click(check, [upload, text, preset, etas, seeds, *fields.values()],
                            [status, request], queue=False).then(
            run_edit, [request], shown + listing, **device)
        rerenders = [trigger(run_render, [rendered, eta, again_seeds], shown + listing, **device)
                     for trigger in (eta.release, again.click, again_seeds.submit)]
        opened = sessions.select(run_open, [listed], shown + listing, **device)
        cancel.click(stop, None, [status], cancels=[edited, *rerenders, opened], queue=False)
        gallery.select(pick, [rendered], [get_image], queue=False)
        refresh.click(lambda: _listing(studio), None, listing, queue=False)
        page.load(lambda: _listing(studio), None, listing, queue=False)
    return page


def _follow(studio: Studio, job, shown: list, listing: list, status, done: str):
    """Yield the status line while `job` runs (its place behind another job, the stage and
    the running loss), then what it made, or its error in one line."""
    last = None
    while not job.done.wait(POLL_S):
        line = ("waiting for the model: another job is running" if job.waiting
                else studio.progress() or "working")
        if line != last:
            yield {status: line}
            last = line
    try:
        render = job.result()
    except Cancelled:
        yield {status: "cancelled: nothing of it was saved"}
        return
    except Exception as err:  # noqa: BLE001 - every failure is shown as one line
        if not isinstance(err, (ImagicError, OSError)):
            log.exception("imagic ui: the job failed")
        yield {status: error(err), **dict(zip(listing, _listing(studio)))}
        return
    yield {**dict(zip(shown, _show(render, done))), **dict(zip(listing, _listing(studio)))}


def _show(render: Render, done: str) -> list:
    """The values of the page's result components for `render`; `done` says what made it."""
    chosen = render.chosen
    line = f"{done} `{render.name}`: {len(render.images)} image(s)"
    if any(s.auto for s in render.images):
        line += "; auto-η's pick is marked"
    return [
        line,
        [(str(s.file), s.caption) for s in render.images],
        str(render.grid) if render.grid else None,
        gr.DownloadButton(value=str(chosen.file) if chosen else None,
                          interactive=chosen is not None),
        gr.DownloadButton(value=str(render.grid) if render.grid else None,
                          interactive=render.grid is not None),
        gr.DownloadButton(value=str(render.session_zip), interactive=True),
        gr.skip(),
        _seeds_text(render.seeds),
        render.info,
        render,
    ]


def _listing(studio: Studio) -> list:
    """The sessions gallery (input, text and model, or why it is broken) and its entries."""
    entries = studio.entries()
    items = []
    for entry in entries:
        if entry.broken:
            items.append((Image.new("RGB", (32, 32), (200, 200, 200)),
                          f"broken: {entry.name}: {entry.broken}"))
        else:
            image = str(entry.input_image) if entry.input_image else Image.new("RGB", (32, 32))
            items.append((image, f"{entry.text} · {entry.model} · {entry.name[:15]}"))
    return [items, entries]


def _skip(components: list) -> dict:
    return {c: gr.skip() for c in components}


def _etas_text(etas) -> str:
    return ",".join(f"{e:g}" for e in etas)


def _seeds_text(seeds) -> str:
    return ",".join(str(s) for s in seeds)


# --------------------------------------------------------------------------- launching


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: int = 20,
          block: bool = True) -> gr.Blocks:
    """Start the page. Uploads over `max_upload_mb` are refused by Gradio before they are
    stored; files are served from the sessions folder and the examples only."""
    page = build_page(studio)
    page.queue(default_concurrency_limit=1)
    small = studio.backend.resolution <= 64  # tiny pictures: enlarge them with sharp pixels
    css = "#gallery img, #grid img, #preview img, #sessions img {image-rendering: pixelated;}"
    allowed = [str(studio.sessions_dir)] + ([str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else [])
    page.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb}mb",
                allowed_paths=allowed, prevent_thread_lock=not block, quiet=not block,
                css=css if small else None, show_error=False,
                ssr_mode=False)
    return page

