"""The vectorised engine: the local updates of all clients of a round, run together.

:func:`fedlib.client.local_update` trains one client after another: E * n_k / B tiny
steps each, so on a CPU most of the time goes to Python and operator overhead, not
arithmetic. Here the m clients of a round are trained *at once*:

- the weights are stacked, one copy per client: every tensor gets a leading client
  axis, ``(m, *shape)``;
- the whole training set stays on the device as one tensor, and a client's
  minibatch is a gather by index (no DataLoader, no per-sample transform);
- one step computes every client's gradient on its own minibatch with
  ``torch.func.vmap(grad_and_value(loss))`` over ``functional_call`` (vmap turns the
  per-client matrix products into batched ones and the convolutions into one
  grouped convolution with ``groups = m``);
- plain SGD (with optional momentum and weight decay, as ``torch.optim.SGD``)
  updates the stacked weights, and the round ends with the n_k-weighted average.

For the paper's 2NN with plain SGD the step is also written out by hand
(:func:`relu_mlp_sgd_step`: batched matrix products, each weight updated in the
same product that computes its gradient). It gives the same weights and is about
twice as fast on a CPU, where a step of B=10 is bound by passes over the weights.

Clients shuffle exactly as in the sequential engine: client k draws its E epochs of
batches with :func:`fedlib.client.epoch_batches` from its own generator, so with the
same seed both engines see the same batches in the same order and end with the same
weights (up to float rounding; ``tests/test_engine.py`` checks it).

Different n_k (Dirichlet and unbalanced partitions, or B not dividing n_k) are
handled by padding and masking. Every client's sequence of batches is padded to
the same number of steps S = max_k E * ceil(n_k / B), and every batch to the same
width (B, or max n_k for B = infinity), with a 0/1 mask marking the real examples:

- the loss of a client is the mean over its *real* examples only
  (``sum(mask * loss) / sum(mask)``), so a short last batch weighs exactly as in
  the sequential engine;
- a client whose batches are exhausted gets an all-zero mask: its gradient is zero
  and its update (weight decay and momentum included) is switched off, so its
  weights stay where its last real step left them.

Padded positions point at example 0 of the training set, so they are valid images
that are simply not counted.

Dropout models run with ``randomness="different"``: every client draws its own
dropout masks, as independent clients would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.nn import functional as F

from fedlib import params as P
from fedlib.client import Weights, check_hyperparameters, epoch_batches
from fedlib.models import TwoNN

# Largest number of examples (clients x batch width) one vectorised step processes,
# by device type; more clients than this allows are trained in groups, one group
# after another. It bounds the activation memory of B = infinity rounds (the CNN
# keeps ~0.5 MB per example for the backward pass): on the CPU a whole MNIST CNN
# run with B = infinity then stays under 2 GiB (benchmarks/README.md).
MAX_EXAMPLES_PER_STEP = {"cpu": 1024, "cuda": 32768}


def vectorized_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run under the vectorised engine, or None if it can.

    Models with buffers (BatchNorm's running statistics) would need per-client
    buffer updates inside vmap, which this engine does not do.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers)}), which the vectorized engine does not update"
    return None


# On a CPU, ``auto`` trains models with more weights than this one client at a time:
# for the paper's CNN (6.6 MB) the m stacked copies overflow the CPU's cache and each
# client's batch already keeps the convolution kernels busy, so the sequential engine
# was measured faster (benchmarks/README.md). The small models stay vectorised.
CPU_VECTORIZED_MAX_MODEL_BYTES = 4 * 2**20


def sequential_is_faster(model: nn.Module) -> str | None:
    """Why ``auto`` should pick the sequential engine for ``model`` on its device, or None."""
    device = next(model.parameters()).device
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cpu" and size > CPU_VECTORIZED_MAX_MODEL_BYTES:
        return (f"on the CPU a model of {size / 2**20:.1f} MB trains faster one client at a time "
                f"(more than {CPU_VECTORIZED_MAX_MODEL_BYTES // 2**20} MB; see benchmarks/README.md)")
    return None


@dataclass
class StackedResult:
    """What the m clients of a round send back, stacked along a leading client axis.

    weights: name -> (m, *shape); num_examples: (m,) the n_k; train_loss: (m,) each
    client's mean training loss over its E epochs; steps: (m,) the SGD steps each took.
    The server averages them with the same ``fedavg`` as the sequential engine's results.
    """

    weights: Weights
    num_examples: torch.Tensor
    train_loss: torch.Tensor
    steps: torch.Tensor

    def client(self, i: int) -> Weights:
        """The weights of the i-th client of the round."""
        return {name: w[i] for name, w in self.weights.items()}


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


def batch_width(sizes: list[int], batch_size: int | None) -> int:
    """W, the width of one padded step: B, but never more than the largest n_k.

    A client with n_k <= B takes its whole local set as one batch, exactly as with
    B = infinity, so a B far beyond every n_k (``--batch-size 1000000``) costs no more
    than B = infinity.
    """
    largest = max(sizes)
    return largest if batch_size is None else min(batch_size, largest)


def vectorized_local_updates(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             client_indices: list[torch.Tensor], generators: list[torch.Generator], *,
                             epochs: int, batch_size: int | None, lr: float, weights: Weights | None = None,
                             momentum: float = 0.0, weight_decay: float = 0.0, mu: float = 0.0,
                             corrections: list[Weights] | None = None,
                             max_examples_per_step: int | None = None) -> StackedResult:
    """ClientUpdate for m clients at once; each client as :func:`fedlib.client.local_update`.

    model: the architecture (its weights are the start unless ``weights`` is given);
    x: (N, C, H, W) the whole training set on the device; y: (N,) its labels.
    client_indices: m index tensors (n_k,) into x; generators: m shuffle generators.
    epochs: E; batch_size: B (None = infinity); lr: eta; momentum, weight_decay as
    in ``torch.optim.SGD``; mu: FedProx's proximal weight; corrections: SCAFFOLD's
    c - c_k, one per client (see ``local_update``). max_examples_per_step: clients x
    batch width per step (default by device, see ``MAX_EXAMPLES_PER_STEP``); more
    clients are run in groups.
    """
    check_hyperparameters(epochs, batch_size, lr, momentum, weight_decay)
    P.MU.check("mu", mu)
    if len(client_indices) == 0 or len(client_indices) != len(generators):
        raise ValueError(f"client_indices and generators must hold one entry per client (>= 1), "
                         f"got {len(client_indices)} and {len(generators)}")
    reason = vectorized_unsupported_reason(model)
    if reason:
        raise ValueError(f"model cannot run vectorized: {reason}")
    if weights is not None:
        model.load_state_dict(weights)
    model.train()
    if max_examples_per_step is None:
        max_examples_per_step = MAX_EXAMPLES_PER_STEP.get(x.device.type, MAX_EXAMPLES_PER_STEP["cpu"])
    width = batch_width([len(idx) for idx in client_indices], batch_size)
    group = max(1, max_examples_per_step // width)
    parts = [_train_group(model, x, y, client_indices[s:s + group], generators[s:s + group],
                          epochs, batch_size, lr, momentum, weight_decay, mu,
                          corrections[s:s + group] if corrections is not None else None)
             for s in range(0, len(client_indices), group)]
    if len(parts) == 1:
        return parts[0]
    return StackedResult({name: torch.cat([p.weights[name] for p in parts]) for name in parts[0].weights},
                         torch.cat([p.num_examples for p in parts]), torch.cat([p.train_loss for p in parts]),
                         torch.cat([p.steps for p in parts]))


def _train_group(model: nn.Module, x: torch.Tensor, y: torch.Tensor, client_indices: list[torch.Tensor],
                 generators: list[torch.Generator], epochs: int, batch_size: int | None, lr: float,
                 momentum: float, weight_decay: float, mu: float = 0.0,
                 corrections: list[Weights] | None = None) -> StackedResult:
    """E epochs of SGD for one group of clients, all at once (see the module docstring)."""
    device = x.device
    m = len(client_indices)
    index, mask = batch_schedule(client_indices, generators, epochs, batch_size)

    params, _ = stack_module_state([model] * m)          # name -> (m, *shape), copies of w_t
    params = {name: p.detach() for name, p in params.items()}
    w_t = {name: p.clone() for name, p in params.items()} if mu else None
    correction = {name: torch.stack([c[name] for c in corrections]) for name in params} if corrections else None
    velocity = {name: torch.zeros_like(p) for name, p in params.items()} if momentum else None

    def client_loss(p: Weights, xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xb,))                    # (W, num_classes)
        losses = F.cross_entropy(logits, yb, reduction="none")       # (W,)
        return (losses * mb).sum() / mb.sum().clamp(min=1)           # mean over real examples

    step = vmap(grad_and_value(client_loss), randomness="different")
    count = mask.sum(2)                                               # (S, m) real examples per step
    all_active = (count > 0).all(1).tolist()                          # steps where no client is done
    index = index.to(device)
    mask, count = mask.to(device=device, dtype=x.dtype), count.to(device=device, dtype=x.dtype)
    by_hand = is_paper_2nn(model) and not (momentum or weight_decay or mu or correction)
    total_loss = torch.zeros(m, device=device, dtype=x.dtype)
    for s in range(index.shape[0]):
        batch = index[s]                                              # (m, W)
        if by_hand:                                                   # same step, ~2x faster on a CPU
            total_loss += relu_mlp_sgd_step(params, x[batch], y[batch], mask[s], lr) * count[s]
            continue
        grads, loss = step(params, x[batch], y[batch], mask[s])
        total_loss += loss.detach() * count[s]
        active = None if all_active[s] else (count[s] > 0).to(x.dtype)   # (m,) 0 once a client is done
        for name, p in params.items():
            d = grads[name]
            if mu:                                                    # FedProx: + mu (w - w_t)
                d = d + mu * (p - w_t[name])
            if correction is not None:                                # SCAFFOLD: + (c - c_k)
                d = d + correction[name]
            if weight_decay:
                d = d.add(p, alpha=weight_decay)
            if momentum:
                v = velocity[name]                                    # torch.optim.SGD's buffer
                if active is None:
                    v.mul_(momentum).add_(d)
                else:
                    v.copy_(torch.where(_per_client(active, v) > 0, momentum * v + d, v))
                d = v
            p.add_(d if active is None else d * _per_client(active, d), alpha=-lr)
    num_examples = torch.tensor([len(idx) for idx in client_indices], device=device)
    steps = (count > 0).sum(0)                                        # (m,) real steps per client
    return StackedResult(params, num_examples, total_loss / (epochs * num_examples), steps)


def is_paper_2nn(model: nn.Module) -> bool:
    """Whether ``model`` is exactly fedlib's TwoNN (not a subclass that may change its forward):
    the one architecture :func:`relu_mlp_sgd_step` computes by hand."""
    return type(model) is TwoNN and [name for name, _ in model.named_children()] == ["fc1", "fc2", "fc3"]


@torch.no_grad()
def relu_mlp_sgd_step(params: Weights, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      lr: float) -> torch.Tensor:
    """One plain-SGD step of every client of the 2NN, with backpropagation written out.

    params: stacked ``fc1``, ``fc2``, ``fc3`` weights (m, d_out, d_in) and biases
    (m, d_out), updated in place; x: (m, W, 1, 28, 28); y, mask: (m, W).
    Returns each client's mean loss over its real examples, (m,).

    Forward, per client: h_1 = relu(h_0 W_1^T + b_1), h_2 = relu(h_1 W_2^T + b_2),
    logits = h_2 W_3^T + b_3. Backward from g = dL/dlogits = (softmax - onehot) / n
    (masked rows 0): dW_i = g^T h_{i-1}, db_i = the sum of g's rows, and
    g <- (g W_i) * [h_{i-1} > 0] for the layer below. Each W_i is updated as soon as
    its gradient is known, in one batched product (``baddbmm_``: W <- W - eta g^T h),
    so no gradient tensor is written and read back; the layer below uses W_i from
    before the update, as autograd would. Same numbers as the vmap step, fewer
    passes over the weights, which is what bounds a step of B=10 on a CPU.
    """
    layers = ("fc1", "fc2", "fc3")
    h = [x.flatten(2)]                                               # (m, W, 784)
    for i, name in enumerate(layers):
        z = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h[-1], params[f"{name}.weight"].transpose(1, 2))
        h.append(z.relu_() if i < len(layers) - 1 else z)
    log_p = h.pop().log_softmax(-1)                                   # (m, W, 10)
    per_example = mask / mask.sum(1, keepdim=True).clamp(min=1)       # 1/n for real rows, 0 for padding
    loss = -(log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * per_example).sum(1)
    g = log_p.exp_().scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(log_p[..., :1]))
    g.mul_(per_example.unsqueeze(-1))                                 # dL/dlogits, (m, W, 10)
    for i in reversed(range(len(layers))):
        weight, bias = params[f"{layers[i]}.weight"], params[f"{layers[i]}.bias"]
        below = torch.bmm(g, weight).mul_(h[i] > 0) if i > 0 else None   # before W_i changes
        weight.baddbmm_(g.transpose(1, 2), h[i], alpha=-lr)
        bias.sub_(g.sum(1), alpha=lr)
        g = below
    return loss


def _per_client(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(m,) -> (m, 1, ..., 1), broadcastable against a stacked tensor like ``like``."""
    return values.view((-1,) + (1,) * (like.dim() - 1))
