"""The training step captured in a CUDA graph and replayed: no Python, no launches, no allocator per step.

A step of the harness GPT launches a few thousand kernels; under a quantized recipe every linear adds
its amax, quantize and GEMM launches, and on a slow host the GPU waits on Python between them. A CUDA
graph records the step's kernels once and replays them with one call (PyTorch's whole-network capture,
``torch.cuda.graph``):

    step 0 .. warmup-1   eager, on a side stream (Triton compiles, autotunes, caches fill)
    step warmup          capture forward + backward + grad clip + AdamW, then replay it
    later steps          copy the batch into the captured input tensors, set the LR tensor, replay

What a replay must not freeze: the batch (static input tensors, copied into), the learning rate (a
device tensor the fused AdamW reads, ``make_optimizer(..., capturable=True)``), and stochastic rounding's
seeds, whose step counters live in device memory (a buffer per layer) so each replay draws new bits (the same
bits as the eager step with host seeds). A recipe whose late switch to BF16 changes which kernels run
triggers a new capture (after one eager step). Single process only: NCCL collectives inside a captured
step (DDP/FSDP2, the amax all-reduce) are left out.
"""

from __future__ import annotations

import torch

__all__ = ["GraphedTrainStep"]


class GraphedTrainStep:
    """``train_step(model, opt, x, y, lr, grad_clip, device)`` with the same math, captured after ``warmup``
    eager steps and replayed. The returned loss and grad-norm tensors are the graph's own outputs: read or
    accumulate them before the next call, which overwrites them."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, warmup: int = 2):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be >= 1 eager step (compiles, lazy init), got {warmup}")
        for group in opt.param_groups:
            if not isinstance(group["lr"], torch.Tensor) or not group.get("capturable", False):
                raise ValueError("GraphedTrainStep needs a capturable optimizer with a tensor learning rate "
                                 "(make_optimizer(..., capturable=True))")  # fmt: skip
        from .. import nn as fnn

        self.model, self.opt, self.device = model, opt, device
        self.layers = [m for _, m in fnn.quant_linears(model)]
        fnn.use_device_seeds(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_left = warmup
        self.phase: tuple | None = None
        self.captures = 0  # how many graphs were captured (one, plus one per late switch)

    def _phase(self) -> tuple:
        """Which layers run their recipe's quantized GEMMs now (the late switch changes the kernels)."""
        return tuple(m.recipe.at(m.progress) is m.recipe for m in self.layers)

    def __call__(self, model, opt, x, y, lr: float, grad_clip: float, device: torch.device):
        from .train import train_step

        if model is not self.model or opt is not self.opt:
            raise ValueError("GraphedTrainStep: called with another model or optimizer than it was built for")
        for group in opt.param_groups:
            group["lr"].fill_(lr)
        phase = self._phase()
        if phase != self.phase:  # first call, or a late switch: capture anew after one eager step
            self.phase, self.graph = phase, None
            self.eager_left = max(self.eager_left, 1)
        if self.graph is None and self.eager_left:
            self.eager_left -= 1
            # after replays the grads are the graph's static tensors, holding the last replay's values:
            # an eager backward would add to them
            opt.zero_grad(set_to_none=True)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loss, gnorm = train_step(model, opt, x, y, lr, grad_clip, device)
            torch.cuda.current_stream(device).wait_stream(side)
            return loss, gnorm
        if self.graph is None:
            self._capture(x, y, grad_clip)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss, self.gnorm

    def _capture(self, x, y, grad_clip: float) -> None:
        from .train import _autocast

        self.graph = None  # free the previous graph's pool first
        self.x, self.y = x.to(self.device).clone(), y.to(self.device).clone()
        self.opt.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with _autocast(self.device, cache_enabled=False):  # autocast's weight cache must not outlive capture
                _, loss = self.model(self.x, self.y)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.opt.step()
        self.graph, self.loss, self.gnorm = graph, loss.detach(), gnorm.detach()
        self.captures += 1
