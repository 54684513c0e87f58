"""GraphedStep's control flow on the CPU, with torch.cuda's streams and graph recording faked:
which steps run eagerly, what a step that cannot be recorded falls back to, which errors are
raised. The recording itself needs a GPU: tests/test_gpu.py."""

import contextlib

import pytest
import torch

from imagic import training
from imagic.training import EagerStep, GraphedStep, make_step


class FakeGraph:
    replays = 0

    def replay(self):
        FakeGraph.replays += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    """Streams that do nothing, a "recording" that runs its body once, a replay that counts, and
    the synchronisation check's mode kept in a dict."""
    mode = {"now": 0}

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in {
        "Stream": Stream, "stream": lambda s: contextlib.nullcontext(),
        "current_stream": Stream, "set_stream": lambda s: None, "CUDAGraph": FakeGraph,
        "graph": lambda *a, **k: contextlib.nullcontext(), "empty_cache": lambda: None,
        "get_sync_debug_mode": lambda: mode["now"],
        "set_sync_debug_mode": lambda m: mode.update(now=m),
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(training, "_recording_failed", False)
    FakeGraph.replays = 0
    return mode


def run(loss_fn, steps=7):
    """`steps` steps of SGD on w = 3 with loss (w·x)², x = 1: eagerly the losses are 9·0.64^k."""
    w = torch.nn.Parameter(torch.tensor([3.0]))
    step = GraphedStep(lambda x: loss_fn(w, x), torch.optim.SGD([w], lr=0.1), "stage test")
    losses = [float(step(torch.tensor([1.0]))) for _ in range(steps)]
    step.close()
    return step, losses


def square(w, x):
    return (w * x).pow(2).sum()


EAGER = [9 * 0.64**k for k in range(7)]


def capturable_adam():
    return torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=1, capturable=True)


def test_make_step_records_only_where_asked_and_the_optimizer_can_be_recorded(fake_cuda):
    assert type(make_step(lambda: 0, capturable_adam(), graphed=True)) is GraphedStep
    assert type(make_step(lambda: 0, capturable_adam(), graphed=False)) is EagerStep
    w = torch.nn.Parameter(torch.ones(1))
    assert type(make_step(lambda: 0, torch.optim.Adam([w]), graphed=True)) is EagerStep


def test_three_eager_steps_then_one_recording_then_replays(fake_cuda):
    calls = []
    step, losses = run(lambda w, x: calls.append(1) or square(w, x))
    assert len(calls) == training.WARMUP_STEPS + 1  # the rest were replays
    assert FakeGraph.replays == 7 - training.WARMUP_STEPS
    assert losses[:3] == pytest.approx(EAGER[:3]) and not step.eager
    assert fake_cuda["now"] == 0  # the check's mode is put back


def test_a_step_that_synchronises_is_caught_in_the_last_warm_up_and_runs_eagerly(fake_cuda):
    def synchronising(w, x):
        if fake_cuda["now"] == "error":  # what PyTorch raises for .item() under the check
            raise RuntimeError("called a synchronizing CUDA operation")
        return square(w, x)

    with pytest.warns(UserWarning, match=r"stage test: the training step cannot be recorded "
                      r"as a CUDA graph \(called a synchronizing CUDA operation\)"):
        step, losses = run(synchronising)
    assert step.eager and FakeGraph.replays == 0
    assert losses == pytest.approx(EAGER)  # the checked step ran once more, not twice
    assert fake_cuda["now"] == 0


def test_other_errors_in_the_checked_step_are_raised(fake_cuda):
    def broken(w, x):
        if fake_cuda["now"] == "error":
            raise RuntimeError("a bug")
        return square(w, x)

    with pytest.raises(RuntimeError, match="a bug"):
        run(broken)
    assert fake_cuda["now"] == 0


def test_a_failed_recording_warns_goes_eager_and_stops_recording_in_the_process(fake_cuda):
    calls = []

    def fails_when_recorded(w, x):
        calls.append(1)
        if len(calls) == training.WARMUP_STEPS + 1:
            raise RuntimeError("not recordable")
        return square(w, x)

    with pytest.warns(UserWarning, match=r"cannot be recorded as a CUDA graph \(not recordable\)"):
        step, losses = run(fails_when_recorded)
    assert step.eager and losses == pytest.approx(EAGER)
    assert training._recording_failed
    assert type(make_step(lambda: 0, capturable_adam(), graphed=True)) is EagerStep


def test_running_out_of_memory_while_recording_is_raised(fake_cuda):
    calls = []

    def out_of_memory_when_recorded(w, x):
        calls.append(1)
        if len(calls) == training.WARMUP_STEPS + 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return square(w, x)

    with pytest.raises(torch.OutOfMemoryError):
        run(out_of_memory_when_recorded)
    assert training._recording_failed
