"""What came after FedAvg: SCAFFOLD's control variates and the server optimizers.

FedAvg's weakness on non-IID data is client drift (lesson 3): each client's local steps
pull the model towards its own data. Three remedies change one piece of Algorithm 1 each
(lesson 8 compares them):

- **FedProx** (Li et al., MLSys 2020) adds ``mu (w - w_t)`` to every local gradient, the
  gradient of a proximal term (mu / 2) ||w - w_t||^2 that holds each client near the global
  model. It lives in :func:`fedlib.client.local_update` (argument ``mu``): nothing changes
  on the server.
- **SCAFFOLD** (Karimireddy et al., ICML 2020) keeps a control variate c_k per client and c
  on the server, estimates of the client's and the global gradient direction, and adds
  ``c - c_k`` to every local gradient, which cancels the client's drift. :class:`Scaffold`
  keeps the control variates between rounds and updates them (the paper's Algorithm 1 with
  option II).
- **Server optimizers** (FedAvgM: Hsu et al. 2019; FedAdam: Reddi et al., ICLR 2021) treat
  the averaged change of the round, w_t - average(w_k), as a gradient (a "pseudo-gradient")
  for an optimizer on the global model: :class:`ServerOptimizer`, a ``torch.optim``
  optimizer. SGD with rate 1 and no momentum is FedAvg itself.

With mu = 0, no control variates and plain server SGD with rate 1, every round is
FedAvg's (``tests/test_algorithms.py`` checks it).
"""

from __future__ import annotations

import torch

from fedlib.client import Weights


class Scaffold:
    """SCAFFOLD's control variates: c on the server, c_k for each client k (zero at first).

    Karimireddy et al. 2020, Algorithm 1, option II. After client k took K local steps of
    rate eta_l from w_t to w_k::

        c_k+ = c_k - c + (w_t - w_k) / (K eta_l)          (its new control variate)
        c   <- c + (1 / N) sum_{k in S_t} (c_k+ - c_k)     (N: all clients)

    A client's c_k is stored only once it has taken part (a client that never did has c_k = 0).
    """

    def __init__(self, w_0: Weights, num_clients: int):
        self.num_clients = num_clients
        self.c = {name: torch.zeros_like(w) for name, w in w_0.items()}
        self.c_k: dict[int, Weights] = {}

    def control(self, k: int) -> Weights:
        """c_k (zeros for a client that has not taken part yet)."""
        return self.c_k.get(int(k)) or {name: torch.zeros_like(w) for name, w in self.c.items()}

    def correction(self, k: int) -> Weights:
        """c - c_k: what client k adds to every local gradient."""
        c_k = self.control(k)
        return {name: self.c[name] - c_k[name] for name in self.c}

    def update(self, w_t: Weights, clients: list[int], client_weights: list[Weights], steps: list[int],
               lr: float) -> None:
        """The control variates after a round in which ``clients`` took ``steps`` SGD steps each."""
        change = {name: torch.zeros_like(w) for name, w in self.c.items()}
        for k, w_k, K in zip(clients, client_weights, steps):
            c_k = self.control(k)
            new = {name: c_k[name] - self.c[name] + (w_t[name] - w_k[name]) / (K * lr) for name in self.c}
            for name in change:
                change[name] += new[name] - c_k[name]
            self.c_k[int(k)] = new
        for name in self.c:
            self.c[name] += change[name] / self.num_clients

    def state_dict(self) -> dict:
        return {"c": self.c, "c_k": {int(k): v for k, v in self.c_k.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.c = dict(state["c"])
        self.c_k = {int(k): dict(v) for k, v in state["c_k"].items()}


class ServerOptimizer:
    """The server's step from w_t to w_{t+1}: an optimizer on the global model whose gradient
    is the round's pseudo-gradient w_t - average(w_k).

    ``sgd`` with lr 1 and momentum 0 is FedAvg (w_{t+1} = the average); with momentum beta
    it is FedAvgM (Hsu et al. 2019). ``adam`` is FedAdam (Reddi et al. 2021), here with
    ``torch.optim.Adam`` and its bias correction (the paper's Algorithm 2 has none; Flower's
    FedAdam corrects the step size as Kingma and Ba do).
    """

    def __init__(self, w_0: Weights, name: str = "sgd", lr: float = 1.0, momentum: float = 0.0,
                 beta2: float = 0.99, tau: float = 1e-3):
        self.params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in w_0.items() if v.is_floating_point()}
        if name == "sgd":
            self.optimizer = torch.optim.SGD(self.params.values(), lr=lr, momentum=momentum)
        elif name == "adam":
            self.optimizer = torch.optim.Adam(self.params.values(), lr=lr, betas=(momentum, beta2), eps=tau)
        else:
            raise ValueError(f"name must be 'sgd' or 'adam', got {name!r}")

    @torch.no_grad()
    def step(self, w_t: Weights, w_avg: Weights) -> Weights:
        """w_{t+1} from w_t and the clients' average (buffers, if any, are taken from the average)."""
        for name, p in self.params.items():
            p.copy_(w_t[name])
            p.grad = w_t[name] - w_avg[name]                 # the pseudo-gradient: minus the average change
        self.optimizer.step()
        return {name: self.params[name].detach().clone() if name in self.params else w_avg[name] for name in w_avg}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
