"""The Flower ServerApp: the server side of the paper's Algorithm 1 with Flower's FedAvg.

Flower's :class:`flwr.serverapp.strategy.FedAvg` is the paper's algorithm:

* ``fraction_train=C`` samples m = int(C * K) of the connected SuperNodes each round
  (``min_train_nodes=1`` gives the paper's max(C * K, 1));
* it averages the returned weights weighted by each reply's ``num-examples``
  metric, which our ClientApp sets to n_k: w_{t+1} = sum_k (n_k / m_t) w_k;
* ``evaluate_fn`` evaluates the global model centrally on the MNIST test set after
  every round, as ``fedlib.run`` does; clients evaluate nothing (``fraction_evaluate=0``).

The one change we make (:class:`FedAvgInClientOrder`) is to average the replies in a
fixed order, so that a run is repeatable, and to note each round's clients and training
loss for the History (a round in which every sampled node failed has no clients, a nan
training loss, and leaves the global model as it was).

The initial weights w_0 come from ``fedlib.server.initial_model``, as in ``fedlib.run``,
so the two runs start from the identical model. The result is a fedlib
:class:`~fedlib.metrics.History`, comparable round by round with ``fedlib.run``'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedlib.config import FedAvgConfig
from fedlib.flower.task import evaluation_data, from_record, to_record
from fedlib.metrics import History, RoundRecord, evaluate
from fedlib.models import model_bytes
from fedlib.params import InputError
from fedlib.server import initial_model, weighted_mean


class FedAvgInClientOrder(FedAvg):
    """Flower's FedAvg, averaging the replies in the order of their client k.

    Flower sums the clients' weights in the order their replies arrive, which changes
    from run to run, and float addition is not associative: the last bits of w_{t+1}
    would differ between two runs of the same configuration, and training amplifies
    such differences. Sorting the replies first (as ``fedlib.fedavg`` sums over the
    sorted S_t) makes a Flower run repeatable. Nothing else changes.
    """

    last_round: tuple[list[int], float] = ([], float("nan"))   # clients, training loss

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.last_round = round_summary([r.content for r in replies if not r.has_error()])

        def client(reply: Message) -> int:
            return -1 if reply.has_error() else int(reply.content["client"]["partition-id"])
        return super().aggregate_train(server_round, sorted(replies, key=client))


def round_summary(contents: list[RecordDict]) -> tuple[list[int], float]:
    """The clients k that replied in a round (sorted) and their n_k-weighted training loss;
    ([], nan) if none did."""
    if not contents:
        return [], float("nan")
    clients = sorted(int(c["client"]["partition-id"]) for c in contents)
    losses = [float(c["metrics"]["train-loss"]) for c in contents]
    n = [int(c["metrics"]["num-examples"]) for c in contents]
    return clients, weighted_mean(losses, n)


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> int:
    """Block until ``num_nodes`` SuperNodes are connected; return how many are.

    Flower's FedAvg can wait too (``min_available_nodes``), but it waits for that
    many nodes before *every* round, so a run that lost a SuperNode would wait
    forever. We wait once, at the start, and then let each round sample from the
    nodes still online.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < num_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {connected} of {num_nodes} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.2)
    return connected


def run_fedavg(grid: Grid, cfg: FedAvgConfig, timeout: float = 600, verbose: bool = True) -> History:
    """FedAvg as ``cfg`` says over the SuperNodes of ``grid``; returns the run's History.

    timeout: seconds a round waits for its replies.
    """
    x_test, y_test, num_classes, input_shape = evaluation_data(cfg)
    model = initial_model(cfg, num_classes, input_shape)          # w_0, as in fedlib.run
    history = History(config={**asdict(cfg), "engine_used": "flower"}, device="cpu")
    strategy = FedAvgInClientOrder(
        # C = 0 is the paper's "one client per round": int(K * 0.5 / K) = 0, lifted to 1 below.
        fraction_train=cfg.frac if cfg.frac > 0 else 0.5 / cfg.num_clients,
        min_train_nodes=1,         # m = max(C * K, 1)
        min_available_nodes=1,     # we waited for the nodes before
        fraction_evaluate=0.0,     # evaluation is central, on the server
        weighted_by_key="num-examples",
    )
    began = time.perf_counter()

    def evaluate_global(t: int, arrays: ArrayRecord) -> MetricRecord:
        """Test accuracy and loss of w_t on the whole MNIST test set, and round t's record."""
        nonlocal began
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = evaluate(model, x_test, y_test)
        if t > 0:
            clients, train_loss = strategy.last_round
            uploaded = (history.records[-1].bytes_uploaded if history.records else 0) + len(clients) * model_bytes(model)
            history.records.append(RoundRecord(t, clients, accuracy, loss, train_loss,
                                               time.perf_counter() - began, uploaded))
            strategy.last_round = ([], float("nan"))        # a round whose replies all failed starts empty
            if verbose:
                print(f"round {t}: {len(clients)} clients, test accuracy {accuracy:.4f}", flush=True)
        began = time.perf_counter()
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
                   timeout=timeout, train_config=ConfigRecord(to_record(cfg)), evaluate_fn=evaluate_global)
    history.model = model
    return history


def build_server_app(configs: Sequence[FedAvgConfig] | None = None,
                     on_history: Callable[[History], None] | None = None,
                     verbose: bool = True) -> ServerApp:
    """A ServerApp running FedAvg once for each of ``configs``, one after the other.

    configs: None reads one configuration from the run config (``pyproject.toml`` and
        ``flwr run --run-config``), the way a deployed app is configured. Several
        configurations share the SuperNodes (and in simulation Ray's start-up); they
        must have the same K.
    on_history: called with each finished History (how a simulation in this process
        gets its results back). A deployed run writes its History to the run config's
        ``history-path`` instead, if that is set.
    verbose: print one line per round.
    """
    if configs is not None and len({c.num_clients for c in configs}) != 1:
        raise InputError(f"configs must be at least one, all with the same num_clients (K), "
                         f"got K = {[c.num_clients for c in configs]}")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = context.run_config
        runs = list(configs) if configs is not None else [from_record(run_config)]
        wait_for_nodes(grid, int(run_config.get("min-nodes", runs[0].num_clients)),
                       float(run_config.get("connect-timeout", 120)))
        for cfg in runs:
            history = run_fedavg(grid, cfg, float(run_config.get("round-timeout", 600)), verbose)
            if run_config.get("history-path"):
                history.save(str(run_config["history-path"]))
            if on_history:
                on_history(history)

    return app


# What `flwr run` loads (see pyproject.toml in this folder): configured by the run config.
app = build_server_app()
