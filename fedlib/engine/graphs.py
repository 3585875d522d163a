"""On a GPU: the engine's steps replayed from CUDA graphs instead of launched one by one.

A step of the batched network is some hundred small kernels. On a GPU each launch
costs a few microseconds of Python and driver time, more than the kernel itself for
models this small, so an eager round is bound by the CPU that launches it. A CUDA
graph records the kernels of ``chunk`` steps once and replays them with one call.

Everything a graph reads or writes must stay at one address, so:

- the weights, momentum, w_t and corrections are the :class:`~fedlib.engine.local.StepTrainer`'s
  own tensors, kept from round to round: a new round copies its start weights into them;
- a round's schedule (examples, their weights, each model's rate, dropout masks) is
  copied, ``chunk`` rows at a time, into static buffers the graph reads from; rows
  beyond the last step are zeros, which a step treats as "every model sits out"
  (zero loss weight and zero rate change nothing);
- the training set x, y is read in place (the cache below holds a reference to it).

A shape (models, batch width, dtype, options) is captured the second time it is seen,
so that a shape that changes every round (B = infinity with unequal n_k) runs eagerly
instead of paying a capture per round. ``FEDLIB_CUDA_GRAPHS=0`` turns graphs off, and a
capture that fails warns once and runs that shape eagerly. On a CPU, ``GraphedSteps``
with ``capture=False`` runs the very same step function eagerly from the same static
buffers, which is how ``tests/test_engine_batched.py`` checks this path without a GPU.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch

# Steps per graph: a round of S steps is ceil(S / chunk) replays (the last one padded).
CHUNK = 16
# Captured shapes kept (each holds its graph's memory and a reference to the training set).
CACHE_SIZE = 4

_cache: OrderedDict = OrderedDict()
_seen: dict = {}
_failed: set = set()


def graphs_enabled(device: torch.device) -> bool:
    """Whether rounds on ``device`` may be replayed from CUDA graphs."""
    return device.type == "cuda" and os.environ.get("FEDLIB_CUDA_GRAPHS", "1") != "0"


class GraphedSteps:
    """``chunk`` steps of a StepTrainer, recorded once and replayed for every chunk of a round.

    trainer: the StepTrainer whose weights the graph updates in place; x, y: the training
    set; m, width: models and batch width; mask_shapes: each dropout layer's per-step mask
    layout. ``capture=False`` runs the same steps eagerly (CPU, tests).
    """

    def __init__(self, trainer, x: torch.Tensor, y: torch.Tensor, m: int, width: int,
                 mask_shapes: dict[str, tuple[int, ...]], chunk: int = CHUNK, capture: bool = True):
        device, dtype = x.device, next(iter(trainer.params.values())).dtype     # x may hold character ids
        self.trainer, self.x, self.y, self.chunk = trainer, x, y, chunk
        self.index = torch.zeros((chunk, m, width), dtype=torch.int64, device=device)
        self.weight = torch.zeros((chunk, m, width), dtype=dtype, device=device)
        self.scale = torch.zeros((chunk, m), dtype=dtype, device=device)
        self.count = torch.zeros((chunk, m), dtype=dtype, device=device)
        self.masks = {name: torch.zeros((chunk,) + shape, dtype=dtype, device=device)
                      for name, shape in mask_shapes.items()}
        self.total = torch.zeros(m, dtype=dtype, device=device)
        self.graph = None
        if capture:
            self._capture()

    def _body(self) -> None:
        for j in range(self.chunk):
            loss = self.trainer.step(self.x, self.y, self.index[j], self.weight[j], self.scale[j],
                                     {name: mask[j] for name, mask in self.masks.items()})
            self.total.add_(loss * self.count[j])

    def _capture(self) -> None:
        # Warm-up on a side stream, as CUDA graphs require; the buffers are zeros, so these
        # steps change nothing (every model sits out).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        self.total.zero_()

    def run(self, index: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, count: torch.Tensor,
            masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """A round's schedule (as ``StepTrainer.run`` lays it out, on the device), chunk by
        chunk; returns each model's summed loss (M,)."""
        self.total.zero_()
        num_steps = index.shape[0]
        for start in range(0, num_steps, self.chunk):
            n = min(self.chunk, num_steps - start)
            rows = slice(start, start + n)
            for static, values in [(self.index, index), (self.weight, weight), (self.scale, scale),
                                   (self.count, count)] + [(self.masks[k], masks[k]) for k in self.masks]:
                static[:n].copy_(values[rows], non_blocking=True)
                if n < self.chunk:
                    static[n:].zero_()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        return self.total.clone()


def cached_steps(key: tuple, make_trainer, x: torch.Tensor, y: torch.Tensor, m: int, width: int,
                 mask_shapes: dict[str, tuple[int, ...]]) -> GraphedSteps | None:
    """The captured steps for ``key`` (built with ``make_trainer()`` on first capture), or
    None: this shape runs eagerly (first sighting, capture failed, or graphs off)."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    if key in _failed:
        return None
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] < 2:
        return None
    try:
        steps = GraphedSteps(make_trainer(), x, y, m, width, mask_shapes)
    except Exception as error:                       # capture is an optimisation: never fail a round for it
        _failed.add(key)
        warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); "
                      "these rounds run without graphs", stacklevel=3)
        return None
    _cache[key] = steps
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return steps


def clear() -> None:
    """Forget every captured graph (and the references they hold)."""
    _cache.clear()
    _seen.clear()
    _failed.clear()
