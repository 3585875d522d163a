"""The vectorised engine: the local updates of many clients, run together.

:func:`fedlib.client.local_update` trains one client after another: E * n_k / B tiny
steps each (a step of the paper's CNN on B = 10 images is a few hundred small
kernels), so most of the time goes to launching operations, not to arithmetic. This
engine trains the M clients of a round, or of several runs at once, as one network:

- ``batched``: the batched model. The M clients' weights are stacked along a leading
  axis, and every layer becomes one large operation over all of them: a convolution
  is one grouped convolution (the clients' channels side by side, ``groups = M``), a
  linear layer one batched matrix product. The sum of the M losses has each client's
  own gradient for each client's weights, so one forward and one backward pass with
  plain autograd train them all.
- ``local``: the steps. One update of all stacked weights per step
  (``torch._foreach_*``): SGD with FedProx's mu, SCAFFOLD's correction, weight
  decay and momentum as ``local_update`` applies them. The paper's 2NN with plain
  SGD has its step written out by hand (each weight updated in the product that
  computes its gradient); a model that is not one of fedlib's falls back to
  ``torch.func.vmap`` over ``functional_call``.
- ``schedule``: everything random about a round, drawn before it runs: each client's
  batches from its own shuffle generator, and each client's dropout masks from its
  own generator with the very call ``nn.Dropout`` makes. Different n_k are padded to
  S steps of width W with a 0/1 mask; a client whose batches are exhausted sits the
  remaining steps out (learning rate 0), so it ends where its last real step left it.
- ``graphs``: on a GPU, ``chunk`` steps are recorded once as a CUDA graph and
  replayed, so a round is not bound by the CPU's kernel launches.
- ``lockstep``: the clients of several runs (learning rates, seeds, partitions, methods)
  trained as one batch of runs x clients models each round, each run with its own rate,
  sampling, partition and strategy (``fedlib.run_many``).

Why it gives the sequential engine's weights: every client trains on the same
batches, in the same order and from the same start as under ``local_update``; only
the grouping of sums differs. Dropout masks: given each client's generator seeded with
``fedlib.seeds.dropout_generator(seed, t, k)`` (``dropout_generators``; the backends
pass them), the engine draws exactly the masks ``nn.Dropout`` draws in the sequential
engine on a CPU, so dropout models are equal too. On a GPU the sequential engine's
``nn.Dropout`` draws from CUDA's generator, so there the two engines use different
masks (the vectorised engine's are drawn on the CPU: the same on every device). ``tests/test_engine.py`` checks both engines equal in float64 (a bound from
the float format) and float32, and that three deliberately wrong engines fail;
``tests/test_engine_batched.py`` the batched model, the masks and the graph steps;
``tests/test_engine_sweep.py`` that runs in lockstep get each run's own weights. How fast it
is, and what bounds it on a CPU, is measured in ``benchmarks/README.md``.
"""

from __future__ import annotations

from torch import nn

from .batched import BatchedModel, program_for
from .local import (MAX_EXAMPLES_PER_STEP, LocalSGD, StackedResult, StepTrainer, is_paper_2nn, relu_mlp_sgd_step,
                    train_models, vectorized_local_updates, vectorized_unsupported_reason)
from .schedule import batch_schedule, batch_width, dropout_masks

__all__ = ["BatchedModel", "CPU_VECTORIZED_MAX_MODEL_BYTES", "LocalSGD", "MAX_EXAMPLES_PER_STEP", "StackedResult",
           "StepTrainer", "batch_schedule", "batch_width", "dropout_masks", "is_paper_2nn", "program_for",
           "relu_mlp_sgd_step", "sequential_is_faster", "train_models", "vectorized_local_updates",
           "vectorized_unsupported_reason"]

# On a CPU, ``auto`` trains models with more weights than this one client at a time (the
# paper's CNN, 6.6 MB): with the previous, vmap-based engine the sequential one was measured
# faster for it. This engine is 1.15x faster than the sequential one for the paper's CNN on
# the Xeon of benchmarks/README.md; the threshold stays until that holds on other CPUs too.
# The small models are vectorised.
CPU_VECTORIZED_MAX_MODEL_BYTES = 4 * 2**20


def sequential_is_faster(model: nn.Module) -> str | None:
    """Why ``auto`` should pick the sequential engine for ``model`` on its device, or None."""
    device = next(model.parameters()).device
    if device.type == "cpu" and any(isinstance(m, nn.LSTM) for m in model.modules()):
        return ("on the CPU an LSTM trains faster one client at a time: nn.LSTM's fused oneDNN kernel beats "
                "the batched layers written out position by position (see benchmarks/README.md)")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cpu" and size > CPU_VECTORIZED_MAX_MODEL_BYTES:
        return (f"on the CPU a model of {size / 2**20:.1f} MB trains faster one client at a time "
                f"(more than {CPU_VECTORIZED_MAX_MODEL_BYTES // 2**20} MB; see benchmarks/README.md)")
    return None
