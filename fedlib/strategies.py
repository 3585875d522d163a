"""The methods: FedAvg and what came after it, each a strategy object.

Algorithm 1 (:func:`fedlib.server.rounds`) asks its strategy three things in every round t,
and each method changes what it needs and inherits the rest from :class:`FedAvg`:

=============================  =====================================  ==========================
hook                           FedAvg (McMahan et al. 2017)           changed by
=============================  =====================================  ==========================
``select(K, C, t)``            S_t: m = max(C K, 1) clients at random  DP-FedAvg (Poisson, q = C)
``client_terms(k)``            nothing added to client k's gradients  FedProx (mu), SCAFFOLD (c - c_k)
``aggregate(w_t, updates, t)`` w_{t+1} = sum_k (n_k / m_t) w_k        SCAFFOLD (updates c, c_k),
                                                                      FedAvgM, FedAdam, FedYogi
                                                                      (a server step), DP-FedAvg
=============================  =====================================  ==========================

What a method keeps between rounds (SCAFFOLD's control variates, a server optimizer's moments)
lives in the strategy and is saved with ``state_dict()``. Aggregating replaces these tensors
with new ones and never changes them in place, so a ``state_dict()`` taken after a round is a
snapshot of that round (a checkpoint relies on it).

A method is one class here, named in :data:`STRATEGIES`; its parameters are fields of
:class:`fedlib.config.FedAvgConfig`, listed in the class's ``knobs`` (``from_config`` reads
them, the config refuses a knob of another method). ``tests/test_algorithms.py`` compares each
method with the paper's equations written out by hand, over several rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedlib import params as P
from fedlib import privacy
from fedlib.client import ClientResult, Weights
from fedlib.params import InputError
from fedlib.seeds import noise_generator, sampling_rng

Updates = dict[int, ClientResult]     # client k -> what it sent back, in the order of S_t


# --- FedAvg's two pieces: sampling S_t and the weighted average --------------------------------------

def num_selected(num_clients: int, frac: float) -> int:
    """m = max(C * K, 1): how many clients take part in each round (C K rounded down)."""
    return max(int(frac * num_clients), 1)


def sample_clients(num_clients: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """S_t: m = max(C * K, 1) distinct clients drawn uniformly without replacement, sorted."""
    P.NUM_CLIENTS.check("num_clients", num_clients)
    P.FRAC.check("frac", frac)
    if not isinstance(rng, np.random.Generator):  # pragma: no mutate block
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return np.sort(rng.choice(int(num_clients), size=num_selected(num_clients, float(frac)), replace=False))


def check_weights(weights_list: Sequence[Weights]) -> None:
    """Raise TypeError/InputError unless ``weights_list`` holds state dicts that can be averaged:
    each a mapping of the same names to dense floating-point tensors (with data: no meta tensor) of
    the same shape, dtype and device as the first client's (nothing is broadcast: a mismatch is a
    mistake, not a shape)."""
    if isinstance(weights_list, (dict, torch.Tensor)) or not isinstance(weights_list, Sequence):  # pragma: no mutate block
        raise TypeError(f"weights_list must be a list of state dicts (one per client), got {type(weights_list).__name__}")
    if len(weights_list) == 0:  # pragma: no mutate block
        raise InputError("weights_list must hold at least one client's weights, got none")
    first = weights_list[0]
    for i, w_k in enumerate(weights_list):
        if not isinstance(w_k, dict):  # pragma: no mutate block
            raise TypeError(f"weights_list[{i}] must be a state dict (name -> tensor), got {type(w_k).__name__}")
        if set(w_k) != set(first):  # pragma: no mutate block
            raise InputError(f"weights_list[{i}] must hold the same tensors as weights_list[0]: missing "
                             f"{sorted(map(str, set(first) - set(w_k)))}, extra {sorted(map(str, set(w_k) - set(first)))}")
        for name, w in w_k.items():
            ref = first[name]
            if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.layout != torch.strided or w.is_meta:  # pragma: no mutate block
                raise TypeError(f"weights_list[{i}][{name!r}] must be a dense floating-point tensor, got "
                                f"{_described(w)}")
            if w.shape != ref.shape or w.dtype != ref.dtype or w.device != ref.device:  # pragma: no mutate block
                raise InputError(f"weights_list[{i}][{name!r}] must have weights_list[0]'s shape, dtype and device "
                                 f"{tuple(ref.shape)}, {ref.dtype}, {ref.device}; got {tuple(w.shape)}, {w.dtype}, {w.device}")


def fedavg(weights_list: Sequence[Weights], num_examples: Sequence[int]) -> Weights:
    """The n_k-weighted average of the clients' weights: sum_k (n_k / m_t) w_k.

    weights_list: one state dict per client of the round; num_examples: their n_k, counts
    (integers in [0, 2^53], exact in float64) with a positive sum. m_t = the examples of this
    round's clients.
    """
    check_weights(weights_list)
    if isinstance(num_examples, (str, bytes, dict)) or not isinstance(num_examples, Sequence):  # pragma: no mutate block
        raise TypeError(f"num_examples must be a list of counts n_k, got {type(num_examples).__name__}")
    if len(weights_list) != len(num_examples):  # pragma: no mutate block
        raise InputError(f"num_examples must have one n_k per client ({len(weights_list)}), got {len(num_examples)}")
    for n_k in num_examples:
        P.NUM_EXAMPLES.check("num_examples[k] (n_k)", n_k)
    if sum(int(n) for n in num_examples) <= 0:  # pragma: no mutate block
        raise InputError(f"num_examples must be >= 0 with a positive sum, got {list(num_examples)}")
    num_examples = [int(n) for n in num_examples]
    m_t = float(sum(num_examples))
    return {name: sum((n_k / m_t) * w_k[name] for w_k, n_k in zip(weights_list, num_examples))
            for name in weights_list[0]}


def weighted_mean(values: Sequence[float], num_examples: Sequence[int]) -> float:
    """sum_k (n_k / m_t) v_k: a per-client number (a training loss) averaged like the weights;
    nan for no clients."""
    total = sum(num_examples)
    return sum(v * n_k for v, n_k in zip(values, num_examples)) / total if total else math.nan


def average(updates: Updates) -> Weights:
    """fedavg over a round's updates."""
    return fedavg([u.weights for u in updates.values()], [u.num_examples for u in updates.values()])


@dataclass(frozen=True)
class ClientTerms:
    """What client k adds to every gradient of its local update (``fedlib.client.local_update``):
    FedProx's proximal weight mu (the term mu (w - w_t)) and SCAFFOLD's correction c - c_k."""

    mu: float = 0.0
    correction: Weights | None = None


def _zeros(w: Weights) -> Weights:
    return {name: torch.zeros_like(v) for name, v in w.items()}


# --- the methods ---------------------------------------------------------------------------------------

class FedAvg:
    """Federated Averaging (McMahan et al. 2017, Algorithm 1): the hooks every other method changes.

    w_0: the initial global weights (shapes and dtype of what the strategy keeps);
    num_clients: K; seed: the run's seed, from which S_t is drawn (``fedlib.seeds``).
    """

    name = "fedavg"
    knobs: tuple[str, ...] = ()        # the FedAvgConfig fields that are this method's parameters
    uploads = 1                        # models a client sends per round
    secret_sample = False              # True: who took part must stay out of the History (DP-FedAvg)

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0):
        self.num_clients, self.seed = num_clients, seed

    @classmethod
    def from_config(cls, config, w_0: Weights) -> "FedAvg":
        """The strategy a FedAvgConfig names, with its knobs' values (a knob left at None takes the
        default of this class's ``__init__``)."""
        return cls(w_0, config.num_clients, config.seed, **cls.config_args(config))

    @classmethod
    def config_args(cls, config) -> dict:
        """The keyword arguments ``from_config`` passes: the knobs that are set."""
        return {k: getattr(config, k) for k in cls.knobs if getattr(config, k) is not None}

    @classmethod
    def check(cls, config) -> None:
        """Raise InputError for a configuration this method does not define (none for FedAvg)."""

    def select(self, num_clients: int, frac: float, t: int) -> np.ndarray:
        """S_t: m = max(C K, 1) clients drawn without replacement from the run's seed and t."""
        return sample_clients(num_clients, frac, sampling_rng(self.seed, t))

    def client_terms(self, k: int) -> ClientTerms:
        """Nothing: FedAvg's clients run plain SGD."""
        return ClientTerms()

    def aggregate(self, w_t: Weights, updates: Updates, t: int) -> Weights:
        """w_{t+1} = sum_k (n_k / m_t) w_k; with no update (every client failed) w_t stays."""
        return average(updates) if updates else w_t

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        _keys(state, (), self.name)


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): every local gradient gets mu (w - w_t) added, the gradient
    of the proximal term (mu / 2) ||w - w_t||^2 that holds each client near the global model.
    Nothing changes on the server; mu = 0 is FedAvg."""

    name = "fedprox"
    knobs = ("mu",)

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0, mu: float = 0.01):
        super().__init__(w_0, num_clients, seed)
        P.MU.check("mu", mu)
        self.mu = mu

    def client_terms(self, k: int) -> ClientTerms:
        return ClientTerms(mu=self.mu)


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II.

    The server keeps c and each client k a control variate c_k (zero until it first takes part).
    Client k adds c - c_k to every local gradient. After client k took u_k local steps of rate
    eta_l from w_t to w_k (K is the number of clients, as everywhere in this book)::

        c_k+ = c_k - c + (w_t - w_k) / (u_k eta_l)         (its new control variate)
        c   <- c + (1 / K) sum_{k in S_t} (c_k+ - c_k)       (K: all clients)
        w_{t+1} = sum_k (n_k / m_t) w_k                      (FedAvg's average: global rate 1)

    Option II's estimate (w_t - w_k) / (u_k eta_l) is the mean gradient of plain SGD steps, so
    client momentum and weight decay are refused. Each client uploads w_k and c_k+ - c_k.
    """

    name = "scaffold"
    uploads = 2

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0, lr: float = 0.1):
        super().__init__(w_0, num_clients, seed)
        self.lr = lr                                   # eta_l, the clients' learning rate
        self.c = _zeros(w_0)
        self.c_k: dict[int, Weights] = {}

    @classmethod
    def config_args(cls, config) -> dict:
        return {"lr": config.lr}

    @classmethod
    def check(cls, config) -> None:
        if config.momentum or config.weight_decay:  # pragma: no mutate block
            raise InputError("scaffold (option II) is defined for plain local SGD: it needs momentum = 0 and "
                             f"weight_decay = 0, got momentum={config.momentum}, weight_decay={config.weight_decay}")

    def control(self, k: int) -> Weights:
        """c_k (zeros for a client that has not taken part yet)."""
        return self.c_k.get(int(k)) or _zeros(self.c)

    def client_terms(self, k: int) -> ClientTerms:
        c_k = self.control(k)
        return ClientTerms(correction={name: self.c[name] - c_k[name] for name in self.c})

    def aggregate(self, w_t: Weights, updates: Updates, t: int) -> Weights:
        change = _zeros(self.c)
        for k, update in updates.items():
            c_k, u_k = self.control(k), update.steps
            new = {name: c_k[name] - self.c[name] + (w_t[name] - update.weights[name]) / (u_k * self.lr)
                   for name in self.c}
            change = {name: change[name] + new[name] - c_k[name] for name in self.c}
            self.c_k[int(k)] = new
        self.c = {name: self.c[name] + change[name] / self.num_clients for name in self.c}
        return super().aggregate(w_t, updates, t)

    def state_dict(self) -> dict:
        return {"c": self.c, "c_k": dict(self.c_k)}

    def load_state_dict(self, state: dict) -> None:
        _keys(state, ("c", "c_k"), self.name)
        c = _checked(state["c"], self.c, "c")
        c_k = state["c_k"]
        if not isinstance(c_k, dict):  # pragma: no mutate block
            raise InputError(f"scaffold's state must hold the clients' control variates c_k, got {type(c_k).__name__}")
        loaded = {}
        for k, value in c_k.items():
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.num_clients:  # pragma: no mutate block
                raise InputError(f"scaffold's c_k must be keyed by clients 0..{self.num_clients - 1}, got {P.shown(k)}")
            loaded[k] = _checked(value, self.c, f"c_k[{k}]")
        self.c, self.c_k = c, loaded


class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al. 2019): the server moves w_t with momentum along the round's average change.

    Delta_t = sum_k (n_k / m_t) w_k - w_t, the change FedAvg would make, then::

        m_t = beta m_{t-1} + Delta_t,     w_{t+1} = w_t + eta_g m_t        (m_0 = 0)

    (SGD with momentum on the pseudo-gradient -Delta_t.) beta = 0 and eta_g = 1 is FedAvg.
    """

    name = "fedavgm"
    knobs = ("server_lr", "server_momentum")

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0, server_lr: float = 1.0,
                 server_momentum: float = 0.9):
        super().__init__(w_0, num_clients, seed)
        P.SERVER_LR.check("server_lr", server_lr)
        P.SERVER_MOMENTUM.check("server_momentum", server_momentum)
        self.eta_g, self.beta = server_lr, server_momentum
        self.m = _zeros(w_0)

    def aggregate(self, w_t: Weights, updates: Updates, t: int) -> Weights:
        if not updates:
            return w_t
        delta = _change(w_t, average(updates))
        self.m = {name: self.beta * self.m[name] + delta[name] for name in delta}
        return {name: w_t[name] + self.eta_g * self.m[name] for name in w_t}

    def state_dict(self) -> dict:
        return {"m": self.m}

    def load_state_dict(self, state: dict) -> None:
        _keys(state, ("m",), self.name)
        self.m = _checked(state["m"], self.m, "m")


class FedAdam(FedAvg):
    """FedAdam (Reddi et al., ICLR 2021, Algorithm 2): Adam on the server, without bias correction.

    Delta_t = sum_k (n_k / m_t) w_k - w_t (the paper averages the clients' changes with equal
    weights; here they are weighted by n_k as in FedAvg, the same when all n_k are equal), then::

        m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t
        v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2
        w_{t+1} = w_t + eta_g m_t / (sqrt(v_t) + tau)

    with m_{-1} = 0 and v_{-1} = tau^2 (the paper's input asks v_{-1} >= tau^2). Defaults are the
    paper's: beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3. (``torch.optim.Adam`` and Flower's FedAdam
    also divide by 1 - beta^t, Kingma and Ba's bias correction: another method.)
    """

    name = "fedadam"
    knobs = ("server_lr", "server_beta1", "server_beta2", "server_tau")

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0, server_lr: float = 0.01,
                 server_beta1: float = 0.9, server_beta2: float = 0.99, server_tau: float = 1e-3):
        super().__init__(w_0, num_clients, seed)
        for name, value, allowed in [("server_lr", server_lr, P.SERVER_LR), ("server_beta1", server_beta1, P.SERVER_BETA),
                                     ("server_beta2", server_beta2, P.SERVER_BETA), ("server_tau", server_tau, P.SERVER_TAU)]:
            allowed.check(name, value)
        self.eta_g, self.beta_1, self.beta_2, self.tau = server_lr, server_beta1, server_beta2, server_tau
        self.m = _zeros(w_0)
        self.v = {name: torch.full_like(w, server_tau ** 2) for name, w in w_0.items()}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Adam: v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2."""
        return self.beta_2 * v + (1 - self.beta_2) * delta ** 2

    def aggregate(self, w_t: Weights, updates: Updates, t: int) -> Weights:
        if not updates:
            return w_t
        delta = _change(w_t, average(updates))
        self.m = {name: self.beta_1 * self.m[name] + (1 - self.beta_1) * delta[name] for name in delta}
        self.v = {name: self.second_moment(self.v[name], delta[name]) for name in delta}
        return {name: w_t[name] + self.eta_g * self.m[name] / (self.v[name].sqrt() + self.tau) for name in w_t}

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        _keys(state, ("m", "v"), self.name)
        m, v = _checked(state["m"], self.m, "m"), _checked(state["v"], self.v, "v")
        if any((v[name] < 0).any() for name in v):  # pragma: no mutate block
            raise InputError("the saved state v (a second moment) holds negative values")
        self.m, self.v = m, v


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021, Algorithm 2): FedAdam with Yogi's second moment, which changes
    v by at most (1 - beta_2) Delta_t^2 per round in either direction::

        v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    """

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        square = delta ** 2
        return v - (1 - self.beta_2) * square * torch.sign(v - square)


class DPFedAvg(FedAvg):
    """DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018): client-level differential privacy.

    Each client takes part independently with probability q = C (S_t may be empty); its update
    Delta_k = w_k - w_t is clipped to L2 norm S; Gaussian noise of standard deviation z S is
    added to the sum, which is divided by the expected number of clients q K, and the server
    steps with its learning rate eta_g (1 by default)::

        w_{t+1} = w_t + eta_g (sum_{k in S_t} clip(Delta_k, S) + N(0, z^2 S^2 I)) / (q K)

    (eta_g scales a step that is already private, so it costs no privacy; with clipping, which
    shortens the updates, it can give the server back the length of step FedAvg would take.)

    The sample and the noise come from the operating system's entropy (``fedlib.privacy``):
    nothing in a run's files regenerates the noise, and the History does not record who took part
    (``secret_sample``: each round's clients are left out, its training loss is None and its uploads
    are the expected q K clients'), since the guarantee counts on the sample being secret.
    ``dp_reproducible=True`` draws both from the run's seed instead, for teaching and tests; the
    seed is stored with every history, so the noise can be recomputed from it and the guarantee is
    void (its History lists S_t and the training loss, as FedAvg's does).
    """

    name = "dp-fedavg"
    knobs = ("dp_clip", "dp_noise", "dp_reproducible", "server_lr")

    def __init__(self, w_0: Weights, num_clients: int, seed: int = 0, frac: float = 0.1, dp_clip: float = 1.0,
                 dp_noise: float = 1.0, dp_reproducible: bool = False, server_lr: float = 1.0):
        super().__init__(w_0, num_clients, seed)
        P.DP_CLIP.check("dp_clip", dp_clip)
        P.DP_NOISE.check("dp_noise", dp_noise)
        P.SERVER_LR.check("server_lr", server_lr)
        self.q, self.clip_norm, self.z, self.reproducible = frac, dp_clip, dp_noise, dp_reproducible
        self.eta_g = server_lr

    @classmethod
    def config_args(cls, config) -> dict:
        return super().config_args(config) | {"frac": config.frac}

    @property
    def secret_sample(self) -> bool:
        return not self.reproducible

    @classmethod
    def check(cls, config) -> None:
        if config.frac == 0:  # pragma: no mutate block
            raise InputError("dp-fedavg needs frac (C) > 0: it samples each client with probability q = C")

    def select(self, num_clients: int, frac: float, t: int) -> np.ndarray:
        """Each of the K clients independently with probability q = C."""
        uniform = sampling_rng(self.seed, t).random(num_clients) if self.reproducible else privacy.secret_uniform(num_clients)
        return privacy.poisson_sample(uniform, self.q)

    def aggregate(self, w_t: Weights, updates: Updates, t: int) -> Weights:
        noise = privacy.seeded_normal(noise_generator(self.seed, t)) if self.reproducible else privacy.secret_normal
        return privacy.dp_aggregate(w_t, [u.weights for u in updates.values()], self.clip_norm, self.z,
                                    self.q * self.num_clients, noise, self.eta_g)


def _change(w_t: Weights, w_avg: Weights) -> Weights:
    """Delta_t = the average minus w_t: the change FedAvg would make in this round."""
    return {name: w_avg[name] - w_t[name] for name in w_t}


def _keys(state: object, expected: tuple[str, ...], method: str) -> None:
    """A saved strategy state must be a mapping of exactly the keys the method keeps."""
    if not isinstance(state, dict) or set(state) != set(expected):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{method}'s saved state must hold exactly {list(expected)}, got {got}")


def _checked(value: object, like: Weights, what: str) -> Weights:
    """A saved state tensor dict, checked (:func:`checked_tensors`)."""
    return checked_tensors(value, like, f"the saved state {what}")


def checked_tensors(value: object, like: Weights, what: str) -> Weights:
    """Saved tensors (a checkpoint's weights, a strategy's state), checked tensor by tensor against
    ``like``: the same names, each dense (no sparse or meta tensor), real floating point, of the same
    shape and finite. Returned on ``like``'s device and dtype; InputError names ``what`` is wrong."""
    if not isinstance(value, dict) or set(value) != set(like):  # pragma: no mutate block
        raise InputError(f"{what} must hold exactly the tensors {sorted(like)}")
    for name, tensor in value.items():
        ref = like[name]
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta \
                or not tensor.is_floating_point() or tuple(tensor.shape) != tuple(ref.shape):  # pragma: no mutate block
            raise InputError(f"{what}[{name}] must be a dense float tensor of shape {tuple(ref.shape)}, got "
                             f"{_described(tensor)}")
        if not torch.isfinite(tensor).all():  # pragma: no mutate block
            raise InputError(f"{what}[{name}] holds inf or nan")
    return {name: value[name].detach().to(device=like[name].device, dtype=like[name].dtype) for name in like}


def _described(value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"a {value.layout} {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"


STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in
                                        (FedAvg, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi, DPFedAvg)}


def knob_owners() -> dict[str, tuple[str, ...]]:
    """Each method knob (a FedAvgConfig field) and the methods that read it."""
    owners: dict[str, tuple[str, ...]] = {}
    for cls in STRATEGIES.values():
        for knob in cls.knobs:
            owners[knob] = owners.get(knob, ()) + (cls.name,)
    return owners


def build(config, w_0: Weights) -> FedAvg:
    """The strategy ``config.strategy`` names, built with its knobs and the run's w_0."""
    return STRATEGIES[config.strategy].from_config(config, w_0)
