"""ClientUpdate for M models at once: the training loop of the engine.

:func:`vectorized_local_updates` is the engine's entry point for one round: it stacks
w_t once per client, draws the round's schedule (``fedlib.engine.schedule``) and runs
the S steps of all clients together. :func:`train_models` is the loop itself, for any
M models of one architecture, each with its own start weights and learning rate: the
clients of one round, or of several runs at once (``fedlib.engine.lockstep``).

A step is one forward and backward pass of the batched network
(``fedlib.engine.batched``), then one update of all stacked weights with
``torch._foreach_*`` operations: SGD, with FedProx's mu (w - w_t), SCAFFOLD's
c - c_k, weight decay and momentum exactly as ``fedlib.client.local_update`` and
``torch.optim.SGD`` apply them. A model whose batches are exhausted (padding) gets
learning rate 0 and keeps its momentum, so it stays where its last real step left it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from fedlib import params as P
from fedlib.client import ClientResult, Weights, check_hyperparameters
from fedlib.data import IGNORE_INDEX
from fedlib.models import TwoNN

from . import schedule as sched
from . import graphs
from .batched import BatchedModel, program_for

# Largest number of examples (models x batch width) one step processes, by device type;
# more models than this allows are trained in groups, one group after another. It bounds
# the activation memory of B = infinity rounds (the CNN keeps ~0.5 MB per example for the
# backward pass): on the CPU a whole MNIST CNN run with B = infinity then stays under 2 GiB.
MAX_EXAMPLES_PER_STEP = {"cpu": 1024, "cuda": 32768}


@dataclass
class StackedResult:
    """What M models send back, stacked along a leading model axis.

    weights: name -> (M, *shape); num_examples: (M,) the n_k; train_loss: (M,) each
    model's mean training loss over its E epochs; steps: (M,) the SGD steps each took.
    The server averages them with the same ``fedavg`` as the sequential engine's results.
    """

    weights: Weights
    num_examples: torch.Tensor
    train_loss: torch.Tensor
    steps: torch.Tensor

    def client(self, i: int) -> Weights:
        """The weights of the i-th model."""
        return {name: w[i] for name, w in self.weights.items()}

    def client_result(self, i: int) -> ClientResult:
        """What the i-th model sends back, as ``local_update`` returns it."""
        return ClientResult(self.client(i), int(self.num_examples[i]), float(self.train_loss[i]), int(self.steps[i]))


@dataclass(frozen=True)
class LocalSGD:
    """The local training every model of a group shares (as ``local_update``'s arguments):
    E, B, momentum, weight decay and FedProx's mu. The learning rate is per model."""

    epochs: int
    batch_size: int | None
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0

    @property
    def plain(self) -> bool:
        return not (self.momentum or self.weight_decay or self.mu)


def vectorized_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run under the vectorised engine, or None if it can.

    Models with buffers (BatchNorm's running statistics) would need per-client
    buffer updates, which this engine does not do.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers)}), which the vectorized engine does not update"
    return None


def vectorized_local_updates(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             client_indices: list[torch.Tensor], generators: list[torch.Generator], *,
                             epochs: int, batch_size: int | None, lr: float,
                             dropout_generators: list[torch.Generator], weights: Weights | None = None,
                             momentum: float = 0.0, weight_decay: float = 0.0, mu: float = 0.0,
                             corrections: list[Weights] | None = None,
                             max_examples_per_step: int | None = None) -> StackedResult:
    """ClientUpdate for m clients at once; each client as :func:`fedlib.client.local_update`.

    model: the architecture (its weights are the start unless ``weights`` is given);
    x: (N, C, H, W) the whole training set on the device; y: (N,) its labels.
    client_indices: m index tensors (n_k,) into x; generators: m shuffle generators.
    epochs: E; batch_size: B (None = infinity); lr: eta; momentum, weight_decay as
    in ``torch.optim.SGD``; mu: FedProx's proximal weight; corrections: SCAFFOLD's
    c - c_k, one per client (see ``local_update``). dropout_generators: one per client,
    seeded as the sequential engine seeds torch before client k
    (``fedlib.seeds.dropout_generator(seed, t, k)``), so that a dropout model draws the
    sequential engine's masks.
    max_examples_per_step: clients x batch width per step (default by device, see
    ``MAX_EXAMPLES_PER_STEP``); more clients are run in groups.
    """
    check_hyperparameters(epochs, batch_size, lr, momentum, weight_decay)
    P.MU.check("mu", mu)
    m = len(client_indices)
    if m == 0 or m != len(generators) or len(dropout_generators) != m:  # pragma: no mutate block
        raise ValueError(f"client_indices, generators and dropout_generators must hold one entry per client "
                         f"(>= 1), got {m}, {len(generators)} and {len(dropout_generators)}")
    reason = vectorized_unsupported_reason(model)
    if reason:  # pragma: no mutate block
        raise ValueError(f"model cannot run vectorized: {reason}")
    if weights is not None:
        model.load_state_dict(weights)
    start = {name: p.detach() for name, p in model.named_parameters()}
    stacked = {name: w.unsqueeze(0).expand(m, *w.shape) for name, w in start.items()}
    correction = {name: torch.stack([c[name] for c in corrections]) for name in start} if corrections else None
    dtype = next(iter(start.values())).dtype                      # the model's: x may hold character ids
    return train_models(model, x, y, stacked, torch.full((m,), float(lr), dtype=dtype), client_indices,
                        generators, dropout_generators, LocalSGD(epochs, batch_size, momentum, weight_decay, mu),
                        correction, max_examples_per_step, uniform_lr=float(lr))


def examples_per_input(x: torch.Tensor) -> int:
    """How many images' worth of activation memory one input of x holds in a training step:
    1 for an image; for a sequence of T character ids, ceil(T / 12) (7 for T = 80). The paper
    LSTM's batched step holds about 3.5 MB per sequence of 80 (its state at every position
    and the backward pass's temporaries, measured on the CPU), the CNN's about 0.5 MB per image."""
    return 1 if x.is_floating_point() else -(-x.shape[1] // 12)


def train_models(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: Weights, lr: torch.Tensor,
                 client_indices: list[torch.Tensor], generators: list[torch.Generator],
                 dropout_generators: list[torch.Generator], sgd: LocalSGD, correction: Weights | None = None,
                 max_examples_per_step: int | None = None, uniform_lr: float | None = None) -> StackedResult:
    """Train M models of ``model``'s architecture at once, each on its own data.

    start: name -> (M, *shape), each model's start weights (for FedProx also its w_t);
    lr: (M,) each model's learning rate; client_indices, generators, dropout_generators:
    one per model (its examples, shuffle stream and dropout stream); correction:
    name -> (M, *shape), SCAFFOLD's c - c_k, or None. uniform_lr: the one rate of
    every model, if they share one (a faster update on the CPU). Models beyond
    ``max_examples_per_step`` (a sequence counting as :func:`examples_per_input` examples)
    are trained in groups, one group after another.
    """
    if max_examples_per_step is None:
        max_examples_per_step = MAX_EXAMPLES_PER_STEP.get(x.device.type, MAX_EXAMPLES_PER_STEP["cpu"])
    width = sched.batch_width([len(idx) for idx in client_indices], sgd.batch_size)
    group = max(1, max_examples_per_step // (width * examples_per_input(x)))
    parts = []
    for s in range(0, len(client_indices), group):
        part = slice(s, s + group)
        parts.append(_train_group(model, x, y, {k: v[part] for k, v in start.items()}, lr[part],
                                  client_indices[part], generators[part], dropout_generators[part], sgd,
                                  {k: v[part] for k, v in correction.items()} if correction is not None else None,
                                  uniform_lr))
    if len(parts) == 1:
        return parts[0]
    return StackedResult({name: torch.cat([p.weights[name] for p in parts]) for name in parts[0].weights},
                         torch.cat([p.num_examples for p in parts]), torch.cat([p.train_loss for p in parts]),
                         torch.cat([p.steps for p in parts]))


def _train_group(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: Weights, lr: torch.Tensor,
                 client_indices: list[torch.Tensor], generators: list[torch.Generator],
                 dropout_generators: list[torch.Generator], sgd: LocalSGD, correction: Weights | None,
                 uniform_lr: float | None) -> StackedResult:
    """E epochs of SGD for one group of models, all at once (see the module docstring).
    The computation runs in the dtype of the weights (x may be integer character ids)."""
    device, dtype = x.device, next(iter(start.values())).dtype
    m = len(client_indices)
    index, mask = sched.batch_schedule(client_indices, generators, sgd.epochs, sgd.batch_size)
    count = mask.sum(2)                                               # (S, M) real examples per step
    program = program_for(model)
    if program is None:                                               # not one of fedlib's models
        total, weights = _train_group_vmap(model, x, y, start, lr, index, mask, sgd, correction)
    else:
        batched = BatchedModel(model, program, channels_last=device.type == "cpu")
        masks = sched.dropout_masks(batched.dropouts, count, dropout_generators, dtype)
        by_hand = is_paper_2nn(model) and sgd.plain and correction is None

        def make_trainer() -> StepTrainer:
            return StepTrainer(batched, start, sgd, correction is not None, by_hand)
        staged = stage(index, mask, count, masks, lr, batched, device, dtype)
        graphed = None
        if graphs.graphs_enabled(device):                             # CUDA: replay recorded steps
            key = (type(model), program, m, index.shape[2], dtype, device, sgd, correction is not None, by_hand,
                   x.data_ptr(), y.data_ptr(), tuple(x.shape))
            graphed = graphs.cached_steps(key, make_trainer, x, y, m, index.shape[2],
                                          {name: tuple(v.shape[1:]) for name, v in staged.masks.items()})
        if graphed is not None:
            graphed.trainer.reset(start, correction)
            total = graphed.run(staged.index, staged.weight, staged.scale, staged.count, staged.masks)
            trainer = graphed.trainer
        else:
            trainer = make_trainer()
            trainer.reset(start, correction)
            total = trainer.run(x, y, staged, uniform_lr)
        weights = {name: p.detach().clone() for name, p in trainer.params.items()}
    num_examples = torch.tensor([len(idx) for idx in client_indices], device=device)
    steps = (count > 0).sum(0).to(device)                              # (M,) real steps per model
    return StackedResult(weights, num_examples, total / (sgd.epochs * num_examples), steps)


@dataclass
class Staged:
    """A round's schedule on the device, as the steps read it: index, weight (S, M, W) the
    examples and their weight in each model's mean loss (1 / n_b, 0 for padding); scale
    (S, M) each model's rate at each step (0 once it is done); count (S, M) its real
    examples; masks: name -> (S, ...) each dropout layer's masks in the batched layout."""

    index: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor
    count: torch.Tensor
    masks: dict[str, torch.Tensor]
    all_active: list[bool]


def stage(index: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, masks: list[torch.Tensor],
          lr: torch.Tensor, batched: BatchedModel, device: torch.device, dtype: torch.dtype) -> Staged:
    """Move a round's schedule to the device, laid out for the steps (see :class:`Staged`)."""
    count_d = count.to(device=device, dtype=dtype)
    weight = mask.to(device=device, dtype=dtype) / count_d.clamp(min=1).unsqueeze(2)     # 1/n_b, or 0
    scale = lr.to(device=device, dtype=dtype) * (count_d > 0).to(dtype)
    return Staged(index.to(device), weight, scale, count_d, batched.layout_masks(masks, device),
                  (count > 0).all(1).tolist())


class StepTrainer:
    """The steps of one group of M models with the batched network.

    params (and momentum, w_t, corrections): name -> (M, *shape), allocated once;
    :meth:`reset` copies a round's start weights into them, so that a CUDA graph
    recorded on them (``fedlib.engine.graphs``) replays on the next round too.
    :meth:`run` runs a round eagerly, one :meth:`step` after another.
    """

    def __init__(self, batched: BatchedModel, like: Weights, sgd: LocalSGD, has_correction: bool, by_hand: bool):
        self.batched, self.sgd, self.by_hand = batched, sgd, by_hand
        fresh = {name: torch.zeros(w.shape, dtype=w.dtype, device=w.device) for name, w in like.items()}
        self.params = {name: w.requires_grad_(True) for name, w in fresh.items()}
        self.names = list(self.params)
        self.w_t = {name: torch.zeros_like(w) for name, w in fresh.items()} if sgd.mu else None
        self.correction = {name: torch.zeros_like(w) for name, w in fresh.items()} if has_correction else None
        self.velocity = {name: torch.zeros_like(w) for name, w in fresh.items()} if sgd.momentum else None
        # Plain SGD: the linear layers update themselves in the backward pass (BatchedLinear),
        # the others ("unfused") from their gradients here.
        self.fused = batched is not None and sgd.plain and not has_correction and not by_hand
        linear = {f"{op[1]}.{p}" for op in (batched.program if batched else ()) if isinstance(op, tuple)
                  and op[0] == "linear" for p in ("weight", "bias")}
        self.unfused = [n for n in self.names if n not in linear]

    def reset(self, start: Weights, correction: Weights | None) -> None:
        """Start a round: every model's weights from ``start`` (and FedProx's w_t), fresh momentum."""
        with torch.no_grad():      # not a decorator: mutmut (make mutation) skips decorated functions
            for name, p in self.params.items():
                p.copy_(start[name])
                if self.w_t is not None:
                    self.w_t[name].copy_(start[name])
                if self.correction is not None:
                    self.correction[name].copy_(correction[name])
                if self.velocity is not None:
                    self.velocity[name].zero_()

    def run(self, x: torch.Tensor, y: torch.Tensor, staged: Staged, uniform_lr: float | None = None) -> torch.Tensor:
        """Train on a round's staged schedule; returns each model's summed training loss (M,).
        uniform_lr: every model's rate, if they share one (a faster update on a CPU)."""
        total = torch.zeros(staged.index.shape[1], device=x.device, dtype=staged.weight.dtype)
        for s in range(staged.index.shape[0]):
            uniform = uniform_lr if staged.all_active[s] else None
            loss = self.step(x, y, staged.index[s], staged.weight[s], staged.scale[s],
                             {n: v[s] for n, v in staged.masks.items()}, uniform)
            total += loss * staged.count[s]
        return total

    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
             scale: torch.Tensor, masks: dict[str, torch.Tensor], uniform_lr: float | None = None) -> torch.Tensor:
        """One SGD step of every model: index, weight (M, W) the examples and their weight
        in the mean (1 / n_b, 0 for padding); scale (M,) each model's rate this step (0: it
        sits out); masks: the step's dropout masks. Returns each model's mean loss (M,)."""
        if self.by_hand:
            with torch.no_grad():
                return relu_mlp_sgd_step(self.params, x[index], y[index], weight,
                                         uniform_lr if uniform_lr is not None else scale)
        fused = (uniform_lr if uniform_lr is not None else scale) if self.fused else None
        logits = self.batched.forward(self.params, self.batched.gather(x, index), masks, fused)   # (M, W, [T,] classes)
        target = y[index]                                                                        # (M, W[, T])
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        per_model = mean_loss_per_model(losses.view(target.shape), target, weight)
        names = self.unfused if self.fused else self.names
        if names:
            grads = torch.autograd.grad(per_model.sum(), [self.params[n] for n in names])
        else:                                            # every layer updated itself in the backward pass
            per_model.sum().backward()
            grads = []
        with torch.no_grad():
            self.update(list(grads), scale, uniform_lr, names)
        return per_model.detach()

    def update(self, grads: list[torch.Tensor], scale: torch.Tensor, uniform_lr: float | None,
               names: list[str] | None = None) -> None:
        """w <- w - eta d for every model (of the parameters ``names``, default all), d as
        ``local_update`` and ``torch.optim.SGD`` form it: the gradient, + mu (w - w_t),
        + (c - c_k), + weight decay * w, through momentum."""
        names = self.names if names is None else names
        if not names:
            return
        params = [self.params[n] for n in names]
        sgd, d = self.sgd, grads
        if sgd.mu:                                                    # FedProx: + mu (w - w_t)
            d = torch._foreach_add(d, torch._foreach_sub(params, [self.w_t[n] for n in names]), alpha=sgd.mu)
        if self.correction is not None:                               # SCAFFOLD: + (c - c_k)
            d = torch._foreach_add(d, [self.correction[n] for n in names])
        if sgd.weight_decay:
            d = torch._foreach_add(d, params, alpha=sgd.weight_decay)
        if sgd.momentum:                                              # torch.optim.SGD's buffer, kept when done
            velocity = [self.velocity[n] for n in names]
            active = (scale > 0).to(scale.dtype)
            keep = active * sgd.momentum + (1 - active)               # momentum, or 1 for a model sitting out
            torch._foreach_mul_(velocity, [_per_model(keep, v) for v in velocity])
            torch._foreach_addcmul_(velocity, d, [_per_model(active, v) for v in velocity])
            d = velocity
        if uniform_lr is not None:                                    # every model steps at the same rate
            torch._foreach_add_(params, d, alpha=-uniform_lr)
        else:
            torch._foreach_addcmul_(params, d, [_per_model(scale, p) for p in params], value=-1)


def mean_loss_per_model(losses: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each model's mean loss over its step's batch (M,), the loss ``local_update`` takes.

    losses, target: (M, W) one per example, or (M, W, T) one per position of a sequence;
    weight: (M, W), 1 / n_b for the batch's real examples and 0 for padding. For sequences
    the mean is over the batch's real characters (the real examples' targets other than
    ``IGNORE_INDEX``), as ``F.cross_entropy`` takes it, not over its sequences.
    """
    if losses.dim() == 2:
        return (losses * weight).sum(1)
    real = (target != IGNORE_INDEX).to(losses.dtype) * (weight > 0).to(losses.dtype).unsqueeze(2)
    return (losses * real).sum((1, 2)) / real.sum((1, 2)).clamp(min=1)


def is_paper_2nn(model: nn.Module) -> bool:
    """Whether ``model`` is exactly fedlib's TwoNN (not a subclass that may change its forward):
    the one architecture :func:`relu_mlp_sgd_step` computes by hand."""
    return type(model) is TwoNN and [name for name, _ in model.named_children()] == ["fc1", "fc2", "fc3"]


def relu_mlp_sgd_step(params: Weights, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                      lr: float | torch.Tensor) -> torch.Tensor:
    """One plain-SGD step of every model of the 2NN, with backpropagation written out.

    params: stacked ``fc1``, ``fc2``, ``fc3`` weights (M, d_out, d_in) and biases
    (M, d_out), updated in place; x: (M, W, 1, 28, 28); y: (M, W); weight: (M, W) each
    example's weight in its model's mean loss (1 / n_b, 0 for padding); lr: eta, or
    (M,) one rate per model. Returns each model's mean loss (M,).

    Forward, per model: h_1 = relu(h_0 W_1^T + b_1), h_2 = relu(h_1 W_2^T + b_2),
    logits = h_2 W_3^T + b_3. Backward from g = dL/dlogits = (softmax - onehot) / n
    (masked rows 0): dW_i = g^T h_{i-1}, db_i = the sum of g's rows, and
    g <- (g W_i) * [h_{i-1} > 0] for the layer below. Each W_i is updated as soon as
    its gradient is known, in one batched product (``baddbmm_``: W <- W - eta g^T h),
    so no gradient tensor is written and read back; the layer below uses W_i from
    before the update, as autograd would. Same numbers as autograd, fewer passes over
    the weights, which is what bounds a step of B = 10 on a CPU.
    """
    with torch.no_grad():      # not a decorator: mutmut (make mutation) skips decorated functions
        layers = ("fc1", "fc2", "fc3")
        per_model = isinstance(lr, torch.Tensor)
        h = [x.flatten(2)]                                               # (M, W, 784)
        for i, name in enumerate(layers):
            z = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h[-1], params[f"{name}.weight"].transpose(1, 2))
            h.append(z.relu_() if i < len(layers) - 1 else z)
        log_p = h.pop().log_softmax(-1)                                   # (M, W, 10)
        loss = -(log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * weight).sum(1)
        g = log_p.exp_().scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(log_p[..., :1]))
        g.mul_(weight.unsqueeze(-1))                                      # dL/dlogits, (M, W, 10)
        for i in reversed(range(len(layers))):
            w, b = params[f"{layers[i]}.weight"], params[f"{layers[i]}.bias"]
            below = torch.bmm(g, w).mul_(h[i] > 0) if i > 0 else None     # before W_i changes
            step = g * lr.view(-1, 1, 1) if per_model else g
            w.baddbmm_(step.transpose(1, 2), h[i], alpha=-1 if per_model else -lr)
            b.sub_(step.sum(1), alpha=1 if per_model else lr)
            g = below
        return loss


def _train_group_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: Weights, lr: torch.Tensor,
                      index: torch.Tensor, mask: torch.Tensor, sgd: LocalSGD, correction: Weights | None
                      ) -> tuple[torch.Tensor, Weights]:
    """The fallback for a model without a program: each step's gradients by
    ``vmap(grad_and_value(loss))`` over ``functional_call``, the same update as the
    batched steps. Dropout draws from torch's global generator (``randomness="different"``).
    Returns each model's summed loss (M,) and the trained weights."""
    device, dtype = x.device, next(iter(start.values())).dtype
    model.train()
    trainer = StepTrainer(None, start, sgd, correction is not None, by_hand=False)
    trainer.reset(start, correction)
    params = {name: p.detach() for name, p in trainer.params.items()}     # the same storage, no autograd

    def client_loss(p: Weights, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xb,))                    # (W, num_classes[, T])
        losses = F.cross_entropy(logits, yb, reduction="none")       # (W[, T])
        return mean_loss_per_model(losses[None], yb[None], wb[None])[0]

    grad_step = vmap(grad_and_value(client_loss), randomness="different")
    count = mask.sum(2).to(device=device, dtype=dtype)
    weight = mask.to(device=device, dtype=dtype) / count.clamp(min=1).unsqueeze(2)
    scale = lr.to(device=device, dtype=dtype) * (count > 0).to(dtype)
    index = index.to(device)
    total = torch.zeros(index.shape[1], device=device, dtype=dtype)
    for s in range(index.shape[0]):
        batch = index[s]
        grads, loss = grad_step(params, x[batch], y[batch], weight[s])
        total += loss.detach() * count[s]
        with torch.no_grad():
            trainer.update([grads[n] for n in trainer.names], scale[s], None)
    return total, params


def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(M,) -> (M, 1, ..., 1), broadcastable against a stacked tensor like ``like``."""
    return values.view((-1,) + (1,) * (like.dim() - 1))
