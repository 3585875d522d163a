"""The clients of Algorithm 1 on Flower: a backend that sends ClientUpdate to SuperNodes.

:class:`FlowerClients` is what ``fedlib.server.rounds`` asks for the clients' updates when the
run goes through Flower (``fedlib.run(config, clients=FlowerClients(grid, config))``): the loop,
the strategy, the evaluation and the History are fedlib's own, exactly as in one process, and
only ClientUpdate travels. In each round it sends a ``train`` message to the SuperNode of every
client k in S_t (w_t, the configuration, the round, and the terms the strategy adds to client k's
gradients) and collects the replies. A client without a SuperNode, or whose SuperNode fails or
does not answer within ``timeout``, simply sends no update, like a phone that went offline; the
round averages the updates that came back.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlib.client import ClientResult, Weights
from fedlib.config import FedAvgConfig
from fedlib.flower.task import to_record
from fedlib.strategies import FedAvg


def client_nodes(grid: Grid, timeout: float) -> dict[int, int]:
    """Client k -> the node ID of the SuperNode that holds it, by asking every connected node."""
    messages = [Message(RecordDict({}), dst_node_id=node, message_type="query") for node in grid.get_node_ids()]
    nodes = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error():
            nodes[int(reply.content["client"]["partition-id"])] = reply.metadata.src_node_id
    return nodes


class FlowerClients:
    """ClientUpdate(k, w_t) for every k in S_t, on the SuperNode that holds client k."""

    name = "flower"

    def __init__(self, grid: Grid, config: FedAvgConfig, timeout: float = 600, verbose: bool = True,
                 nodes: dict[int, int] | None = None):
        self.grid, self.config, self.timeout, self.verbose = grid, config, timeout, verbose
        self.secret = False                      # whether this round's sample is secret (set by update)
        self.nodes = client_nodes(grid, timeout) if nodes is None else nodes

    def message(self, k: int, w_t: Weights, t: int, strategy: FedAvg) -> Message:
        terms = strategy.client_terms(k)
        content = RecordDict({"arrays": ArrayRecord({name: w.cpu() for name, w in w_t.items()}),
                              "config": ConfigRecord(to_record(self.config) | {"server-round": t}),
                              "terms": ConfigRecord({"mu": float(terms.mu)})})
        if terms.correction is not None:
            content["correction"] = ArrayRecord({name: c.cpu() for name, c in terms.correction.items()})
        return Message(content, dst_node_id=self.nodes[k], message_type="train")

    def update(self, w_t: Weights, S_t: np.ndarray, t: int, strategy: FedAvg) -> dict[int, ClientResult]:
        reachable = [int(k) for k in S_t if int(k) in self.nodes]
        self.secret = strategy.secret_sample     # DP-FedAvg: who took part, and how many, stay out of the log
        self.say(f"round {t}: " + ("S_t is secret; sent to its clients with a SuperNode" if self.secret
                                   else f"S_t has {len(S_t)} clients, {len(reachable)} with a SuperNode; "
                                        f"sent to {reachable}"))
        replies = self.grid.send_and_receive([self.message(k, w_t, t, strategy) for k in reachable],
                                             timeout=self.timeout)
        updates, failed = {}, []
        for reply in replies:
            if reply.has_error():
                failed.append(reply.error.reason)
                continue
            try:
                k, update = reply_update(reply.content, w_t, set(reachable))
            except (KeyError, TypeError, ValueError) as error:     # a reply that is not a ClientUpdate
                failed.append(f"a malformed reply ({error})")
                continue
            updates[k] = update
        missing = len(reachable) - len(updates)
        counts = "the replies are in" if self.secret else f"{len(updates)} updates came back, {missing} did not"
        self.say(f"round {t}: {counts}"
                 + (f" ({'; '.join(sorted(set(failed)))})" if failed else ""))
        return dict(sorted(updates.items()))

    def say(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)


def reply_update(content: RecordDict, w_t: Weights, asked: set[int]) -> tuple[int, ClientResult]:
    """Client k and its ClientResult from a train reply, checked: a client that was asked, w_k with exactly
    w_t's tensors and shapes (moved beside w_t, e.g. to the GPU), n_k and u_k positive integers. Anything
    else raises ValueError (the round then treats the client as failed)."""
    k = content["client"]["partition-id"]
    if not isinstance(k, int) or isinstance(k, bool) or k not in asked:
        raise ValueError(f"client {k!r} was not asked in this round")
    w_k = content["arrays"].to_torch_state_dict()
    if set(w_k) != set(w_t) or any(tuple(w_k[n].shape) != tuple(w_t[n].shape) for n in w_t):
        raise ValueError(f"client {k} sent weights of another model")
    metrics = content["metrics"]
    n_k, steps, loss = metrics["num-examples"], metrics["steps"], metrics["train-loss"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n_k, steps)):
        raise ValueError(f"client {k} sent n_k = {n_k!r}, u_k = {steps!r}")
    weights = {name: w.to(device=w_t[name].device, dtype=w_t[name].dtype) for name, w in w_k.items()}
    return k, ClientResult(weights, n_k, float(loss), steps)
