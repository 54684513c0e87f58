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

# Set once a recording has failed in this process: PyTorch can leave its allocator mid-capture
# after a failed recording (pytorch/pytorch#180395), so no later stage records another.
_recording_failed = False


def adam(params, lr: float, graphed: bool = False) -> torch.optim.Adam:
    """Adam; its fused CUDA kernel when every parameter is on a GPU (one launch per step instead
    of several per tensor: for a full UNet fine-tune, a few ms a step), which a CUDA graph can
    record when `graphed` (capturable: its step count lives on the GPU), unless a recording
    already failed in this process."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
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
                torch.cuda.empty_cache()  # stream (on an H100 stage 1 reserved 37.7 GiB so)
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
        # activations live in the graph's own memory pool; torch.cuda.graph first gives the
        # allocator's cached blocks back (the warm-up's). That is not enough for a 24 GB card:
        # under a 23.5 GiB cap stage 2's recording ran out of memory, on fragmentation
        # (docs/PERFORMANCE.md, "CUDA graphs"), hence editor.uses_cuda_graphs.
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
