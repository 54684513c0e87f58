"""The optimizer loop of stages 1 and 2: Adam over draws of (t, ε), with a progress bar.

Both stages call `train`. It picks how each step runs (eagerly, or recorded once as a CUDA graph
and replayed where the card has room for it), turns gradient checkpointing on for the stage when
the config asks, and reads the losses back from the device in groups. `measured` records a
stage's seconds and peak GPU memory.

Eagerly, every step launches each of the model's kernels from Python, several thousand a step;
for small batches that takes longer than the kernels themselves, so the GPU waits for the CPU. A
CUDA graph records the step's kernels once and replays them with one launch (PyTorch's
"whole-network capture", torch.cuda.graphs): the same kernels on the same memory, so a replay
needs its new inputs, the step's draws (t, ε), copied into the recorded ones.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

WARMUP_STEPS = 3  # eager steps before the recording (PyTorch's docs warm up 3 iterations)

# Set once a recording has failed in this process: PyTorch can leave its allocator mid-capture
# after a failed recording (pytorch/pytorch#180395), so no later stage records another.
_recording_failed = False


def adam(params, lr: float, graphed: bool = False) -> torch.optim.Adam:
    """Adam over tensors, or over parameter groups (dicts with their own "lr"); its fused CUDA
    kernel when every parameter is on a GPU (one launch per step instead of several per tensor:
    for a full UNet fine-tune, a few ms a step), which a CUDA graph can record when `graphed`
    (capturable: its step count lives on the GPU), unless a recording already failed in this
    process."""
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if params and isinstance(
        params[0], dict) else params
    fused = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
    capturable = fused and graphed and not _recording_failed
    return torch.optim.Adam(params, lr=lr, fused=fused or None, capturable=capturable)


class EagerStep:
    """`step(*inputs)`: zero the gradients, loss = loss_fn(*inputs), backward, Adam step; returns
    the loss (detached, still on the device)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer):
        self.loss_fn, self.optimizer = loss_fn, optimizer

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*inputs)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def close(self) -> None:
        """Free the last step's gradients (for a full fine-tune, as large as the model)."""
        self.optimizer.zero_grad(set_to_none=True)


class GraphedStep(EagerStep):
    """The same step, recorded once as a CUDA graph and replayed.

    The first WARMUP_STEPS steps run eagerly on a side stream (so lazy set-up, Adam's states, the
    kernels' algorithm choices, happens before the recording, as PyTorch's docs do it); they
    are steps of the run, on its own draws. The last of them runs with PyTorch's
    synchronisation check raising: a step that reads a value back to the CPU cannot be recorded,
    and is found there, eagerly (the stage then warns and stays eager), rather than by a failed
    recording. The next step is recorded on the same stream, and it and every later one replay
    the recording after their draws are copied into its inputs. The draws come from the same
    generator in the same order as an eager run's, so the run is the eager one up to the
    kernels' rounding.
    """

    def __init__(self, loss_fn, optimizer, label: str = "a stage"):
        super().__init__(loss_fn, optimizer)
        self.label = label
        self.steps = 0
        self.side = torch.cuda.Stream()  # the warm-up's and the recording's stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.loss: torch.Tensor | None = None
        self.eager = False  # set when the step cannot be recorded

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.eager:
            return super().__call__(*inputs)
        if self.steps <= WARMUP_STEPS:
            if self.steps == 1:  # blocks cached for the default stream cannot serve the side
                torch.cuda.empty_cache()  # stream: give them back rather than reserve twice
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = (self._checked(inputs) if self.steps == WARMUP_STEPS
                        else super().__call__(*inputs))
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        if self.graph is None and not self._record(inputs):
            return super().__call__(*inputs)
        for recorded, value in zip(self.inputs, inputs):
            recorded.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites it

    def _checked(self, inputs) -> torch.Tensor:
        """The last warm-up step, with synchronising operations raising. If one does, nothing was
        updated yet (Adam's fused step does not synchronise), and the step runs again as usual;
        any other error is the step's own and is raised."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().__call__(*inputs)
        except RuntimeError as err:
            if "synchronizing CUDA operation" not in str(err):
                raise
            reason = str(err)  # a string: the error's frames (and the step's tensors) go now
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        self._give_up(reason)
        return super().__call__(*inputs)

    def _record(self, inputs) -> bool:
        global _recording_failed
        self.inputs = tuple(x.clone() for x in inputs)
        # The recorded backward must write the gradients, not add to them. They and the
        # activations live in the graph's own memory pool, which the allocator's cached blocks
        # cannot serve: hence `uses_cuda_graphs`' memory rule.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        previous = torch.cuda.current_stream()
        cause = None  # the recording's own error; ending the recording may then raise another
        try:
            with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
                try:
                    loss = self.loss_fn(*self.inputs)
                    loss.backward()
                    self.optimizer.step()  # recorded, not run: parameters are unchanged so far
                except RuntimeError as err:
                    cause = err
                    raise
        except RuntimeError as err:  # out of memory, or what the check above did not catch
            _recording_failed = True
            torch.cuda.set_stream(previous)  # a failed recording can leave its stream current
            self.inputs = ()
            self.optimizer.zero_grad(set_to_none=True)
            if isinstance(cause or err, torch.OutOfMemoryError):
                raise
            reason, cause = str(cause or err), None
            self._give_up(reason)
            return False
        self.graph, self.loss = graph, loss.detach()
        return True

    def _give_up(self, reason: str) -> None:
        self.eager = True
        warnings.warn(f"{self.label}: the training step cannot be recorded as a CUDA graph "
                      f"({reason.splitlines()[0] if reason else 'no reason given'}); the stage "
                      "goes on without it, slower", stacklevel=4)

    def close(self) -> None:
        """Free the recording and its memory pool (gradients and activations)."""
        super().close()
        recorded = self.graph is not None
        self.graph, self.inputs, self.loss = None, (), None
        if recorded:
            torch.cuda.empty_cache()  # the pool's blocks back to the card, not kept cached


def make_step(loss_fn, optimizer, graphed: bool, label: str = "a stage") -> EagerStep:
    """GraphedStep where asked for and the optimizer can be recorded (fused Adam with every
    trained tensor on a GPU, `adam(..., graphed=True)`), unless a recording already failed in
    this process; EagerStep otherwise."""
    capturable = all(group.get("capturable") for group in optimizer.param_groups)
    if graphed and capturable and not _recording_failed:
        return GraphedStep(loss_fn, optimizer, label)
    return EagerStep(loss_fn, optimizer)


# --------------------------------------------------------------------------- the loop

READBACK_EVERY = 10  # optimizer steps between reading the losses back from the device
GRAPHS_MIN_GIB = 40  # cuda_graphs None: record only with this much GPU memory to use


def train(backend, config, params: Sequence[torch.Tensor], lr: float,
          draw: Callable[[], tuple[torch.Tensor, ...]],
          loss_at: Callable[..., torch.Tensor], steps: int, label: str,
          quiet: bool = False) -> list[float]:
    """`steps` Adam steps on `params` at rate `lr`: each draws (t, ε) with `draw()` and minimizes
    `loss_at(t, ε)`. The config decides the rest: CUDA graphs (`uses_cuda_graphs`) and gradient
    checkpointing. Returns every step's loss, in order."""
    graphed = uses_cuda_graphs(config, backend.device)
    optimizer = adam(params, lr=lr, graphed=graphed)
    with checkpointing(backend, config.gradient_checkpointing):
        return optimize(draw, loss_at, optimizer, steps, label, quiet, graphed=graphed)


def optimize(draw, loss_fn, optimizer, steps: int, label: str, quiet: bool,
             graphed: bool = False) -> list[float]:
    """The loop itself, with a progress bar showing a running mean of the loss.

    The losses stay on the device and are read back every READBACK_EVERY steps: reading one
    (`.item()`) waits for the GPU to finish, which would stop the CPU from queueing the next
    step's kernels while the current ones run.
    """
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    bar = tqdm(range(steps), desc=label, disable=quiet, leave=True)
    running = None
    step_fn = make_step(loss_fn, optimizer, graphed, label)
    try:
        for step in bar:
            pending.append(step_fn(*draw()))
            if len(pending) == READBACK_EVERY or step == steps - 1:
                for value in torch.stack(pending).tolist():
                    losses.append(value)
                    running = value if running is None else 0.95 * running + 0.05 * value
                pending.clear()
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    finally:
        step_fn.close()  # the gradients (and a recording's memory) are not needed after it
    return losses


def uses_cuda_graphs(config, device: torch.device | str) -> bool:
    """Whether stages 1–2 record their training step as a CUDA graph: `config.cuda_graphs` where
    it is True or False; where it is None (`fast`), on a CUDA device whose free memory plus what
    PyTorch already holds there (within any cap set with
    torch.cuda.set_per_process_memory_fraction) is at least GRAPHS_MIN_GIB. A recording holds
    its memory in a pool of its own, so the allocator reserves far more than it allocates
    (docs/PERFORMANCE.md). Never under gradient checkpointing, which a recording does not hold."""
    device = torch.device(device)
    if device.type != "cuda" or config.gradient_checkpointing:
        return False
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):  # a cap set on this process
        usable = min(usable, torch.cuda.get_per_process_memory_fraction(device) * total)
    return usable >= GRAPHS_MIN_GIB * 2**30


@contextmanager
def checkpointing(backend, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for one stage's optimization, when the config asks for it."""
    if not enabled:
        yield
        return
    backend.set_gradient_checkpointing(True)
    try:
        yield
    finally:
        backend.set_gradient_checkpointing(False)


@contextmanager
def measured(timings: dict[str, float], name: str, device) -> Iterator[None]:
    """Record a step's seconds as timings[name_s] and, on a GPU, its peak memory as
    timings[name_peak_gib] (torch.cuda.max_memory_allocated: tensors, not the allocator's
    cache) and timings[name_reserved_gib] (max_memory_reserved: what the allocator held from
    the card, cache included). Every stage ends by reading a result back, so the clock stops
    after the GPU."""
    cuda = torch.device(device).type == "cuda"
    for kind in ("peak", "reserved"):  # a loaded session's figures are not this run's
        timings.pop(f"{name}_{kind}_gib", None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    timings[f"{name}_s"] = time.perf_counter() - start
    if cuda:
        timings[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        timings[f"{name}_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
