"""A round's schedule, drawn before it runs: every model's batches and dropout masks.

The engine trains M models in lock-step, so everything random about a step is drawn
up front, from exactly the streams the sequential engine draws from, and laid out as
tensors with one row per step:

- :func:`batch_schedule`: which examples each model trains on at each step. Model i
  shuffles with its own generator, consumed as :func:`fedlib.client.epoch_batches`
  consumes it, so it sees the sequential engine's batches in the same order.
- :func:`dropout_masks`: the mask of every dropout layer at every step. Model i draws
  from its own generator, layer after layer and step after step, with the very call
  ``nn.Dropout`` makes (``torch.empty(shape).bernoulli_(1 - p)``, then ``div_(1 - p)``)
  on a tensor of the shape ``nn.Dropout`` would use. A client seeded like the
  sequential engine's ``torch.manual_seed(dropout_seed(seed, t, k))`` therefore gets
  exactly its masks (on a CPU, where that engine's masks come from the CPU generator;
  ``tests/test_engine_batched.py`` checks it against ``nn.Dropout`` itself).

Different n_k are padded: every model gets S = max_k E * ceil(n_k / B) steps of width
W = :func:`batch_width`, with a 0/1 mask marking the real examples (padding points at
example 0 of the training set and is not counted).
"""

from __future__ import annotations

import functools
import math

import torch

from fedlib.client import epoch_batches


def batch_width(sizes: list[int], batch_size: int | None) -> int:
    """W, the width of one padded step: B, but never more than the largest n_k.

    A client with n_k <= B takes its whole local set as one batch, exactly as with
    B = infinity, so a B far beyond every n_k (``--batch-size 1000000``) costs no more
    than B = infinity.
    """
    largest = max(sizes)
    return largest if batch_size is None else min(batch_size, largest)


def batch_schedule(client_indices: list[torch.Tensor], generators: list[torch.Generator],
                   epochs: int, batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's E epochs of minibatches, padded into one index tensor.

    client_indices: per client, its (n_k,) indices into the training set.
    generators: per client, its shuffle generator (consumed as ``local_update`` does).
    Returns ``index`` (S, m, W) int64 training-set indices and ``mask`` (S, m, W)
    float32, 1 for real examples and 0 for padding; S = the most steps any client
    takes, W = :func:`batch_width`.
    """
    sizes = [len(idx) for idx in client_indices]
    width = batch_width(sizes, batch_size)
    steps = [epochs * (math.ceil(n_k / batch_size) if batch_size is not None else 1) for n_k in sizes]
    num_steps, m = max(steps), len(sizes)
    local = torch.full((num_steps, m, width), -1, dtype=torch.int64)
    for i, (n_k, generator) in enumerate(zip(sizes, generators)):
        per_epoch = steps[i] // epochs
        for e in range(epochs):
            order = torch.cat(epoch_batches(n_k, batch_size, generator))       # the same shuffle
            padded = torch.full((per_epoch * width,), -1, dtype=torch.int64)
            padded[:n_k] = order
            local[e * per_epoch:(e + 1) * per_epoch, i] = padded.view(per_epoch, width)
    mask = local >= 0
    index = torch.zeros_like(local)
    for i, idx in enumerate(client_indices):
        real = mask[:, i]
        index[:, i][real] = idx.cpu()[local[:, i][real]]
    return index, mask.to(torch.float32)


def dropout_masks(layers: list, counts: torch.Tensor, generators: list[torch.Generator],
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Every dropout mask of a round, for each layer (S, M, W, *layer.shape), scaled by 1 / (1 - p).

    layers: the model's dropout layers in forward order (``DropoutLayer``: p and the
    shape of one example's mask); counts: (S, M) the real examples of each model at
    each step (0: the model sits the step out and draws nothing); generators: one per
    model. Rows beyond a step's count are 0. Model i's masks are what ``nn.Dropout``
    draws, layer after layer and step after step, from a generator in the same state.
    """
    num_steps, m = counts.shape
    width = int(counts.max()) if counts.numel() else 0
    out = [torch.zeros((num_steps, m, width) + layer.shape, dtype=dtype) for layer in layers]
    if not layers or width == 0:
        return out
    per_example = [layer.numel for layer in layers]
    for i, generator in enumerate(generators):
        steps = [(s, int(c)) for s, c in enumerate(counts[:, i].tolist()) if c > 0]
        if _draws_concatenate(dtype):          # one draw per model and p, cut into the steps' masks
            _masks_in_one_draw(layers, per_example, steps, generator, dtype, out, i)
            continue
        for s, b in steps:                     # one draw per step and layer, exactly as nn.Dropout
            for layer, mask in zip(layers, out):
                noise = torch.empty((b,) + layer.shape, dtype=dtype).bernoulli_(1 - layer.p, generator=generator)
                mask[s, i, :b] = noise.div_(1 - layer.p)
    return out


def _masks_in_one_draw(layers: list, per_example: list[int], steps: list[tuple[int, int]],
                       generator: torch.Generator, dtype: torch.dtype, out: list[torch.Tensor], i: int) -> None:
    """Model i's masks from as few draws as give the same numbers (see ``_draws_concatenate``)."""
    if len({layer.p for layer in layers}) > 1:          # different p: a draw per step and layer is needed
        for s, b in steps:
            for layer, mask in zip(layers, out):
                noise = torch.empty((b,) + layer.shape, dtype=dtype).bernoulli_(1 - layer.p, generator=generator)
                mask[s, i, :b] = noise.div_(1 - layer.p)
        return
    p = layers[0].p
    per_step = [b * sum(per_example) for _, b in steps]
    flat = torch.empty(sum(per_step), dtype=dtype).bernoulli_(1 - p, generator=generator).div_(1 - p)
    widths = {b for _, b in steps}
    if len(widths) == 1:                                 # every step the same width: no loop over steps
        b, at = widths.pop(), torch.tensor([s for s, _ in steps])
        rows, start = flat.view(len(steps), -1), 0
        for layer, mask, n in zip(layers, out, per_example):
            mask[at, i, :b] = rows[:, start:start + b * n].reshape((len(steps), b) + layer.shape)
            start += b * n
        return
    offset = 0
    for s, b in steps:
        for layer, mask, n in zip(layers, out, per_example):
            mask[s, i, :b] = flat[offset:offset + b * n].view((b,) + layer.shape)
            offset += b * n


@functools.cache
def _draws_concatenate(dtype: torch.dtype) -> bool:
    """Whether two ``bernoulli_`` draws in a row give the numbers of one draw of both sizes.

    They do where the CPU generator fills a tensor element by element (PyTorch's own
    kernel); a kernel that seeds a vectorised library from the generator once per call
    would not. Checked once per process and dtype, so the engine never assumes it.
    """
    g = torch.Generator().manual_seed(12345)
    first = torch.empty(7, dtype=dtype).bernoulli_(0.5, generator=g)
    second = torch.empty(13, dtype=dtype).bernoulli_(0.5, generator=g)
    g = torch.Generator().manual_seed(12345)
    both = torch.empty(20, dtype=dtype).bernoulli_(0.5, generator=g)
    return torch.equal(torch.cat([first, second]), both)
