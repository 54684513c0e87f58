"""A saved session is checked file by file, against the loaded model too, before anything is
applied: a bad one is refused in one line naming the file, nothing is written, and no tensor is
ever broadcast into the model."""

import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_photo
from imagic import EditConfig, EditSession, Imagic, SessionError, load_backend
from imagic.cli import main
from imagic.errors import ModelError

QUICK = EditConfig(embed_steps=1, finetune_steps=1, finetune_lr=1e-3, lora_lr=1e-2,
                   sample_steps=1, etas=(1.0,))
TEXT = "a photo of a sitting dog"


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return load_backend(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sessions(backend, tmp_path_factory):
    """One saved session per delta kind, made once; each test works on a copy."""
    folder = tmp_path_factory.mktemp("sessions")
    for kind in ("full", "lora"):
        editor = Imagic(backend, replace(QUICK, finetune=kind), quiet=True)
        editor.fit(make_photo(), TEXT).save(folder / kind)
    return folder


@pytest.fixture
def session(sessions, tmp_path, request):
    kind = getattr(request, "param", "full")
    path = tmp_path / "session"
    shutil.copytree(sessions / kind, path)
    return path


def state(backend):
    return {k: v.detach().clone() for k, v in backend.unet.state_dict().items()}


def unchanged(before, backend) -> bool:
    now = state(backend)
    return now.keys() == before.keys() and all(torch.equal(v, now[k]) for k, v in before.items())


# ------------------------------------------------------------------- ways to damage a session


def edit_manifest(session, change):
    path = session / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def edit_tensors(session, name, change):
    """Rewrite a safetensors file; for the delta, the manifest's counts follow, so only the
    change itself is wrong."""
    path = session / name
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    change(tensors)
    save_file(tensors, path, metadata=metadata)
    if name == "delta.safetensors":
        edit_manifest(session, lambda m: m["delta"].update(
            tensors=len(tensors), parameters=sum(t.numel() for t in tensors.values())))


def truncate(session, name):
    data = (session / name).read_bytes()
    (session / name).write_bytes(data[: len(data) // 2])


def every_embedding(change):
    return lambda s: edit_tensors(s, "embeddings.safetensors",
                                  lambda t: t.update({k: change(v) for k, v in t.items()}))


def a_vector(tensors):
    """The name of a delta tensor with one dimension of more than one value (a bias)."""
    return next(k for k, v in tensors.items() if v.ndim == 1 and v.numel() > 1)


def shrink_a_vector(tensors):
    name = a_vector(tensors)
    tensors[name] = tensors[name][:1].clone()  # [1] for [N]: would broadcast if accepted


def put_nan(tensors):
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


def rename_one(tensors):
    tensors["not_in_the_model.weight"] = tensors.pop(a_vector(tensors))


def drop_one(tensors):
    tensors.pop(next(iter(tensors)))


def fifo(session, name):
    (session / name).unlink()
    os.mkfifo(session / name)


def link_outside(session, name):
    outside = session.parent / f"outside-{name}"
    (session / name).rename(outside)  # a valid file, so only the link itself is wrong
    (session / name).symlink_to(outside)


def set_lora_rank(rank):
    def change(manifest):
        manifest["delta"]["lora_rank"] = rank
        manifest["config"]["lora_rank"] = rank
    return lambda s: edit_manifest(s, change)


def resize_input(size):
    return lambda s: make_photo(size).save(s / "input.png")


CASES = {
    # the files themselves
    "truncated delta": ("full", lambda s: truncate(s, "delta.safetensors"), "delta.safetensors"),
    "truncated embeddings": ("full", lambda s: truncate(s, "embeddings.safetensors"),
                             "embeddings.safetensors"),
    "empty delta": ("full", lambda s: (s / "delta.safetensors").write_bytes(b""),
                    "delta.safetensors"),
    "empty manifest": ("full", lambda s: (s / "manifest.json").write_text(""), "manifest.json"),
    "folder for delta": ("full", lambda s: ((s / "delta.safetensors").unlink(),
                                            (s / "delta.safetensors").mkdir()),
                         "delta.safetensors"),
    "missing input": ("full", lambda s: (s / "input.png").unlink(), "input.png"),
    "manifest is a fifo": ("full", lambda s: fifo(s, "manifest.json"), "manifest.json"),
    "delta is a fifo": ("full", lambda s: fifo(s, "delta.safetensors"), "delta.safetensors"),
    "input links outside": ("full", lambda s: link_outside(s, "input.png"), "input.png"),
    "embeddings link outside": ("full", lambda s: link_outside(s, "embeddings.safetensors"),
                                "embeddings.safetensors"),
    # the manifest's schema
    "manifest is a list": ("full", lambda s: (s / "manifest.json").write_text("[1, 2]"),
                           "manifest.json"),
    "text is a number": ("full", lambda s: edit_manifest(s, lambda m: m.update(text=3)),
                         "manifest.json"),
    "no delta field": ("full", lambda s: edit_manifest(s, lambda m: m.pop("delta")),
                       "manifest.json"),
    "model is a string": ("full", lambda s: edit_manifest(s, lambda m: m.update(model="sd")),
                          "manifest.json"),
    "weird delta kind": ("full", lambda s: edit_manifest(
        s, lambda m: m["delta"].update(kind="weird")), "manifest.json"),
    "lora rank not a number": ("lora", lambda s: edit_manifest(
        s, lambda m: m["delta"].update(lora_rank="x")), "manifest.json"),
    "etas a string": ("full", lambda s: edit_manifest(
        s, lambda m: m["config"].update(etas="0.7")), "manifest.json"),
    "timings a string": ("full", lambda s: edit_manifest(
        s, lambda m: m["timings"].update(stage1_s="fast")), "manifest.json"),
    # the embeddings
    "embeddings too narrow": ("full", every_embedding(lambda v: v[..., :4].contiguous()),
                              "embeddings.safetensors"),
    "embeddings too few tokens": ("full", every_embedding(lambda v: v[:, :8].contiguous()),
                                  "embeddings.safetensors"),
    "embeddings of integers": ("full", every_embedding(lambda v: v.to(torch.int32)),
                               "embeddings.safetensors"),
    "embeddings of float16": ("full", every_embedding(lambda v: v.half()),
                              "embeddings.safetensors"),
    "embeddings with nan": ("full", lambda s: edit_tensors(s, "embeddings.safetensors", put_nan),
                            "embeddings.safetensors"),
    "only e_tgt": ("full", lambda s: edit_tensors(
        s, "embeddings.safetensors",
        lambda t: [t.pop(k) for k in list(t) if k.startswith("e_opt.")]),
        "embeddings.safetensors"),
    # the delta
    "delta of shape [1] for [N]": ("full", lambda s: edit_tensors(s, "delta.safetensors",
                                                                  shrink_a_vector),
                                   "delta.safetensors"),
    "delta with nan": ("full", lambda s: edit_tensors(s, "delta.safetensors", put_nan),
                       "delta.safetensors"),
    "delta name not in the model": ("full", lambda s: edit_tensors(s, "delta.safetensors",
                                                                   rename_one),
                                    "delta.safetensors"),
    "lora rank not the tensors'": ("lora", set_lora_rank(2), "delta.safetensors"),
    "lora tensor missing": ("lora", lambda s: edit_tensors(s, "delta.safetensors", drop_one),
                            "delta.safetensors"),
    "lora rank 0": ("lora", set_lora_rank(0), "manifest.json"),
    # the input
    "input is text": ("full", lambda s: (s / "input.png").write_text("not an image"),
                      "input.png"),
    "input not square": ("full", resize_input((80, 64)), "input.png"),
    "input of another size": ("full", resize_input((32, 32)), "input.png"),
}


def hang_up(signum, frame):
    raise TimeoutError("imagic generate hung on the session")


@pytest.mark.parametrize(
    "session, damage, file",
    [pytest.param(kind, damage, file, id=name) for name, (kind, damage, file) in CASES.items()],
    indirect=["session"],
)
def test_a_bad_session_is_one_line_naming_the_file_and_writes_nothing(capsys, tmp_path, session,
                                                                       damage, file):
    damage(session)
    out = tmp_path / "render"
    signal.signal(signal.SIGALRM, hang_up)
    signal.alarm(120)  # a FIFO opened for reading would block for ever
    try:
        code = main(["generate", str(session), "--eta", "1", "--out", str(out), "--quiet"])
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert file in err
    assert not out.exists()


def test_a_valid_session_still_renders_with_a_link_inside_it(capsys, tmp_path, session):
    (session / "inputs").mkdir()
    (session / "input.png").rename(session / "inputs" / "input.png")
    (session / "input.png").symlink_to(os.path.join("inputs", "input.png"))
    out = tmp_path / "render"
    code = main(["generate", str(session), "--eta", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "eta1.00_seed0.png").is_file()


def test_the_python_api_refuses_a_delta_of_the_wrong_shape(backend, session):
    edit_tensors(session, "delta.safetensors", shrink_a_vector)
    loaded = EditSession.load(session)  # needs the model to see it: loads
    before = state(backend)
    with pytest.raises(SessionError, match=r"delta\.safetensors .*shape \[1\]"):
        Imagic(backend, quiet=True).generate(loaded)
    # and the backend itself never broadcasts, whoever calls it
    with pytest.raises(ModelError, match="do not fit"), backend.apply_delta(loaded.delta):
        pass
    assert unchanged(before, backend)


@pytest.mark.parametrize("model", ["tiny", "embedded"])
def test_lora_shapes_are_a_fresh_adapters_and_leave_the_model_alone(backend, model):
    backend = backend if model == "tiny" else load_backend(None)
    before = state(backend)
    shapes = backend.delta_shapes("lora", 3)
    assert unchanged(before, backend)
    with torch.random.fork_rng():
        backend.trainable_parameters("lora", lora_rank=3)
    delta = backend.take_delta()
    assert {k: tuple(v.shape) for k, v in delta.tensors.items()} == shapes
    assert backend.delta_shapes("full") == {k: tuple(v.shape) for k, v in
                                            backend.unet.named_parameters()}


# ------------------------------------------------------------------- fuzz


FILES = ("manifest.json", "embeddings.safetensors", "delta.safetensors", "input.png")
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(
                            st.text(max_size=4), st.integers(), max_size=2))


def mutate_tensors(path, data):
    """Resize, retype, rename, drop or poison one tensor of a safetensors file."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open's API
    name = data.draw(st.sampled_from(sorted(tensors)))
    how = data.draw(st.sampled_from(["resize", "retype", "rename", "drop", "nan", "scalar"]))
    t = tensors.pop(name)
    if how == "resize":
        shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
        tensors[name] = torch.zeros(shape)
    elif how == "retype":
        dtype = data.draw(st.sampled_from([torch.int32, torch.float16, torch.float64,
                                           torch.bfloat16, torch.uint8]))
        tensors[name] = t.to(dtype)
    elif how == "rename":
        tensors[data.draw(st.text("abc._", min_size=1, max_size=12))] = t
    elif how == "nan":
        tensors[name] = t.flatten().index_fill(0, torch.tensor([0]), float("nan")).view(t.shape)
    elif how == "scalar":
        tensors[name] = torch.tensor(1.0)
    if tensors:
        save_file(tensors, path)
    else:
        path.write_bytes(b"")


def mutate_manifest(path, data):
    """Drop a field, or give it another JSON value, at the top or one level down."""
    manifest = json.loads(path.read_text())
    key = data.draw(st.sampled_from(sorted(manifest)))
    target = manifest
    if isinstance(manifest[key], dict) and manifest[key] and data.draw(st.booleans()):
        target, key = manifest[key], data.draw(st.sampled_from(sorted(manifest[key])))
    if data.draw(st.booleans()):
        del target[key]
    else:
        target[key] = data.draw(JSON_VALUES)
    path.write_text(json.dumps(manifest))


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_a_mutated_session_is_refused_in_one_error_or_renders_correctly(
        data, backend, sessions, tmp_path_factory):
    """Random damage to a saved session (a file truncated or overwritten, a tensor resized,
    retyped, renamed, dropped or poisoned, a manifest field removed or retyped) ends in a
    SessionError, or in a render of the right size when the damage left a usable session;
    the model is never changed."""
    path = tmp_path_factory.mktemp("fuzzed") / "session"
    shutil.copytree(sessions / data.draw(st.sampled_from(["full", "lora"])), path)
    file = path / data.draw(st.sampled_from(FILES))
    how = data.draw(st.sampled_from(["truncate", "garbage", "edit"]))
    if how == "truncate":
        size = file.stat().st_size
        file.write_bytes(file.read_bytes()[: data.draw(st.integers(0, max(size - 1, 0)))])
    elif how == "garbage":
        file.write_bytes(data.draw(st.binary(max_size=64)))
    elif file.suffix == ".safetensors":
        mutate_tensors(file, data)
    elif file.name == "manifest.json":
        mutate_manifest(file, data)
    else:
        file.write_bytes(file.read_bytes()[:40])  # input.png cut inside its header
    before = state(backend)
    try:
        images = Imagic(backend, quiet=True).generate(EditSession.load(path), sample_steps=1)
    except SessionError as err:
        assert "\n" not in str(err) and str(path) in str(err), str(err)
    else:
        assert all(r.image.size == (backend.resolution,) * 2 for r in images)
    assert unchanged(before, backend)
