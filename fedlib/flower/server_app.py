"""The Flower ServerApp: fedlib's Algorithm 1, with Flower carrying ClientUpdate to the SuperNodes.

The server side of the paper's Algorithm 1 is ``fedlib.server.rounds``, the same loop as in
one process, run by ``fedlib.run`` with its evaluation, History and stopping rules; Flower is
the *backend* that computes each round's client updates (:class:`~fedlib.flower.clients.
FlowerClients`): it sends w_t to the SuperNodes of the clients in S_t and collects their w_k.
So the clients of each round are the ones the strategy draws from the run's seed, the average
is fedlib's, and every method fedlib has (FedProx, SCAFFOLD, the server optimizers, DP-FedAvg)
runs on Flower as it runs in one process: a Flower run of a configuration is the run
``fedlib.run`` makes with the sequential engine, to the last bit when every client replies.

The initial weights w_0 come from ``fedlib.server.initial_model``, as in ``fedlib.run``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlib.config import FedAvgConfig
from fedlib.flower.clients import FlowerClients, client_nodes
from fedlib.flower.task import dataset, from_record
from fedlib.metrics import History
from fedlib.params import InputError
from fedlib.runner import run


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> int:
    """Block until ``num_nodes`` SuperNodes are connected; return how many are.

    We wait once, at the start; a SuperNode that goes away later only stops answering
    (its clients send no update), so a run never waits for it forever.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < num_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {connected} of {num_nodes} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.2)
    return connected


def run_on_flower(grid: Grid, config: FedAvgConfig, timeout: float = 600, verbose: bool = True,
                  nodes: dict[int, int] | None = None) -> History:
    """``fedlib.run(config)`` with the clients on the SuperNodes of ``grid``; returns the run's History.

    timeout: seconds a round waits for its replies. nodes: client k -> its SuperNode's ID, if already
    known (else every node is asked).
    """
    clients = FlowerClients(grid, config, timeout, verbose, nodes)

    def say(record) -> None:
        if verbose:
            took_part = "S_t secret" if clients.secret else f"{len(record.clients)} clients"
            print(f"round {record.round}: {took_part}, test accuracy {record.test_accuracy}",
                  flush=True)
    return run(config, dataset(config.dataset, config.input_scaling), progress=False, clients=clients, on_round=say)


def build_server_app(configs: Sequence[FedAvgConfig] | None = None,
                     on_history: Callable[[History], None] | None = None,
                     verbose: bool = True) -> ServerApp:
    """A ServerApp running each of ``configs`` one after the other on the connected SuperNodes.

    configs: None reads one configuration from the run config (``pyproject.toml`` and
        ``flwr run --run-config``), the way a deployed app is configured. Several
        configurations share the SuperNodes (and in simulation Ray's start-up); they
        must have the same K.
    on_history: called with each finished History (how a simulation in this process
        gets its results back). A deployed run writes its History to the run config's
        ``history-path`` instead, if that is set.
    verbose: print a line when a round is sent and when it is done.
    """
    if configs is not None and (not configs or len({c.num_clients for c in configs}) != 1):
        raise InputError(f"configs must be at least one, all with the same num_clients (K), "
                         f"got K = {[c.num_clients for c in configs or []]}")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = context.run_config
        runs = list(configs) if configs is not None else [from_record(run_config)]
        wait_for_nodes(grid, int(run_config.get("min-nodes", runs[0].num_clients)),
                       float(run_config.get("connect-timeout", 120)))
        timeout = float(run_config.get("round-timeout", 600))
        nodes = client_nodes(grid, timeout)            # asked once; the runs share the SuperNodes
        for config in runs:
            history = run_on_flower(grid, config, timeout, verbose, nodes)
            if run_config.get("history-path"):
                history.save(str(run_config["history-path"]))
            if on_history:
                on_history(history)

    return app


# What `flwr run` loads (see pyproject.toml in this folder): configured by the run config.
app = build_server_app()
