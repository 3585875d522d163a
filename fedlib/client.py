"""ClientUpdate: what one client does in a round of FedAvg.

The paper's Algorithm 1, client side::

    ClientUpdate(k, w):                 # run on client k
        B <- split P_k into batches of size B
        for each local epoch i from 1 to E:
            for batch b in B:
                w <- w - eta * grad l(w; b)
        return w to server

``local_update`` is exactly that, in plain PyTorch, one client at a time. It is the
readable reference; ``fedlib.engine`` runs many clients at once and is tested
equal to it. Two of the methods that came after FedAvg change only this step, by adding
a term to every gradient (lesson 8): FedProx's ``mu (w - w_t)`` and SCAFFOLD's
``c - c_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedlib import params as P
from fedlib.params import InputError

Weights = dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """What a client sends back: its new weights w_k, its n_k, its mean training loss,
    and how many SGD steps it took (u_k = E * ceil(n_k / B), :func:`local_steps`)."""

    weights: Weights
    num_examples: int
    train_loss: float
    steps: int


def check_hyperparameters(epochs: int, batch_size: int | None, lr: float,
                          momentum: float = 0.0, weight_decay: float = 0.0) -> None:  # pragma: no mutate block
    """Raise InputError (a ValueError) naming any local-training parameter outside its range."""
    P.LOCAL_EPOCHS.check("epochs", epochs)
    P.BATCH_SIZE.check("batch_size", batch_size)
    P.LR.check("lr", lr)
    P.MOMENTUM.check("momentum", momentum)
    P.WEIGHT_DECAY.check("weight_decay", weight_decay)


def local_steps(num_examples: int, epochs: int, batch_size: int | None) -> int:
    """u = E * ceil(n_k / B): the SGD steps of one client in one round (B = None: one step per
    epoch). The last batch of an epoch is smaller when B does not divide n_k, and still a step;
    the paper writes u = E n / (K B) for its equal clients (n_k = n / K = 600, B = 10: u = 60)."""
    P.LOCAL_EPOCHS.check("epochs", epochs)
    P.BATCH_SIZE.check("batch_size", batch_size)
    return epochs * (1 if batch_size is None else -(-num_examples // batch_size))


def epoch_batches(num_examples: int, batch_size: int | None,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One epoch's minibatches: a fresh shuffle of 0..n_k-1 cut into pieces of B.

    ``batch_size=None`` is the paper's B = infinity: the whole local set as one batch.
    The last batch is smaller when B does not divide n_k. Indices are drawn on the
    CPU so the same generator gives the same batches on every device.
    """
    order = torch.randperm(num_examples, generator=generator)
    if batch_size is None:
        return [order]
    return list(order.split(batch_size))


def local_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                 batch_size: int | None, lr: float, weights: Weights | None = None,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None, mu: float = 0.0,
                 correction: Weights | None = None) -> ClientResult:
    """Run E epochs of minibatch SGD on one client's data and return its new weights.

    model: the architecture; it starts from ``weights`` (the global w_t) if given,
        else from its current weights, and is trained in place.
    x: (n_k, C, H, W) the client's images; y: (n_k,) their labels.
    epochs: E; batch_size: B (None = infinity); lr: eta.
    momentum, weight_decay: off by default, as in the paper's plain SGD.
    generator: the random stream for shuffling (one per client and round).
    mu: FedProx (Li et al. 2020): every gradient gets mu (w - w_t) added, the gradient
        of (mu / 2) ||w - w_t||^2, which holds w near the global model. 0 is FedAvg.
    correction: SCAFFOLD (Karimireddy et al. 2020): c - c_k for every parameter, added to
        every gradient so that the client follows the global direction. None is FedAvg.
    """
    check_hyperparameters(epochs, batch_size, lr, momentum, weight_decay)
    P.MU.check("mu", mu)
    if len(y) == 0 or len(x) != len(y):  # pragma: no mutate block
        raise InputError(f"a client needs n_k >= 1 examples with one label each, got {len(x)} inputs and "
                         f"{len(y)} labels")
    if weights is not None:
        model.load_state_dict(weights)
    model.train()
    w_t = {name: p.detach().clone() for name, p in model.named_parameters()} if mu else None
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_k, steps = len(y), 0
    total_loss = torch.zeros((), device=y.device, dtype=next(model.parameters()).dtype)   # x may hold ids
    for _ in range(epochs):
        for batch in epoch_batches(n_k, batch_size, generator):
            batch = batch.to(y.device)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if mu or correction is not None:
                add_to_gradients(model, w_t, mu, correction)
            optimizer.step()
            total_loss += loss.detach() * len(batch)
            steps += 1
    new_weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return ClientResult(new_weights, n_k, total_loss.item() / (epochs * n_k), steps)


def add_to_gradients(model: nn.Module, w_t: Weights | None, mu: float, correction: Weights | None) -> None:
    """FedProx's mu (w - w_t) and SCAFFOLD's c - c_k, added to every parameter's gradient."""
    with torch.no_grad():      # editing .grad is not part of the model: autograd records nothing
        for name, p in model.named_parameters():
            if mu:
                p.grad.add_(p - w_t[name], alpha=mu)
            if correction is not None:
                p.grad.add_(correction[name])
