"""One optimizer step of stages 1 and 2 (forward, backward, Adam), run eagerly or replayed as a
CUDA graph.

Eagerly, every step launches each of the UNet's kernels from Python: several thousand a step.
On an H100 that takes longer than the kernels themselves up to K = 8 timesteps per step (an SD-1.5
stage-2 step costs 163–177 ms at K = 1, 4 and 8 alike, ../shared/perf), so the GPU waits for the
CPU. A CUDA graph records the step's kernels once and replays them with one launch
(PyTorch's "whole-network capture", torch.cuda.graphs): the same kernels on the same memory, so a
replay needs its new inputs, here the step's draws (t, ε), copied into the recorded ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # eager steps before the recording (PyTorch's docs warm up 3 iterations)


def adam(params, lr: float, graphed: bool = False) -> torch.optim.Adam:
    """Adam; its fused CUDA kernel when every parameter is on a GPU (one launch per step instead
    of several per tensor: for a full UNet fine-tune, a few ms a step), which a CUDA graph can
    record when `graphed` (capturable: its step count lives on the GPU)."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, capturable=fused and graphed)


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
    are steps of the run, on its own draws. The next step is recorded, and it and every later
    one replay the recording after their draws are copied into its inputs. The draws come from the
    same generator in the same order as an eager run's, so the run is the eager one up to the
    kernels' rounding. If recording fails (a model part that reads a value back to the CPU,
    for instance), a warning says so and the rest of the stage runs eagerly.
    """

    def __init__(self, loss_fn, optimizer, label: str = "a stage"):
        super().__init__(loss_fn, optimizer)
        self.label = label
        self.steps = 0
        self.side = torch.cuda.Stream()  # the warm-up's stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.loss: torch.Tensor | None = None
        self.failed = False

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if self.failed:
            return super().__call__(*inputs)
        if self.steps <= WARMUP_STEPS:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = super().__call__(*inputs)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        if self.graph is None and not self._record(inputs):
            return super().__call__(*inputs)
        for recorded, value in zip(self.inputs, inputs):
            recorded.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites it

    def _record(self, inputs) -> bool:
        self.inputs = tuple(x.clone() for x in inputs)
        # The recorded backward must write the gradients, not add to them. They and the
        # activations live in the graph's own memory pool; torch.cuda.graph first gives the
        # allocator's cached blocks back (the warm-up's), so a 24 GB card does not hold both.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.loss_fn(*self.inputs)
                loss.backward()
                self.optimizer.step()  # recorded, not run: parameters are unchanged so far
        except RuntimeError as err:
            self.failed = True
            self.inputs = ()
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"{self.label}: the training step could not be recorded as a CUDA "
                          f"graph ({str(err).splitlines()[0]}); the stage goes on without it, "
                          "slower", stacklevel=3)
            return False
        self.graph, self.loss = graph, loss.detach()
        return True

    def close(self) -> None:
        """Free the recording and its memory pool (gradients and activations)."""
        super().close()
        self.graph, self.inputs, self.loss = None, (), None


def make_step(loss_fn, optimizer, graphed: bool, label: str = "a stage") -> EagerStep:
    """GraphedStep where asked for and every trained tensor is on a CUDA device (the graph
    records one device's kernels), EagerStep otherwise."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if graphed and params and all(p.is_cuda for p in params):
        return GraphedStep(loss_fn, optimizer, label)
    return EagerStep(loss_fn, optimizer)
