"""The Flower ClientApp: ClientUpdate(k, w) of the paper, run by a SuperNode.

Every SuperNode (a real process in a deployment, a virtual one in simulation)
holds one client's partition; Flower tells it which through its node config
(``partition-id``, ``num-partitions``). The ServerApp (``fedlib.flower.server_app``)
first asks every node which client it is (a ``query`` message), then, in each round,
sends a ``train`` message to the nodes of the clients in S_t. For each one the ClientApp

1. reads the global weights w_t (an ``ArrayRecord``), the run's configuration (a
   ``ConfigRecord``: every FedAvgConfig field, plus the round t as ``server-round``) and
   the terms the method adds to its gradients (``terms``: FedProx's mu; ``correction``:
   SCAFFOLD's c - c_k as an ``ArrayRecord``);
2. runs fedlib's :func:`~fedlib.client.local_update` unchanged on its n_k examples,
   shuffling with the same per-client, per-round seed as ``fedlib.run``;
3. replies with its new weights w_k, a ``MetricRecord`` with n_k, its training loss and
   its number of steps, and a ``ConfigRecord`` saying which client k it is.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlib.client import local_update
from fedlib.flower.task import client_data, evaluation_data, from_record
from fedlib.models import build_model
from fedlib.params import InputError
from fedlib.runtime import set_threads
from fedlib.seeds import dropout_seed, shuffle_generator

app = ClientApp()


def partition_of(context: Context) -> tuple[int, int]:
    """This SuperNode's client k and the K of the split it belongs to (its node config)."""
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client k this SuperNode holds, so that the server can address it."""
    k, num_partitions = partition_of(context)
    return Message(content=RecordDict({"client": ConfigRecord({"partition-id": k, "num-partitions": num_partitions})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One ClientUpdate(k, w_t) on this node's partition k."""
    set_threads(1)                   # many clients run side by side (Ray actors, SuperNodes): one thread each
    config = from_record(msg.content["config"])
    k, num_partitions = partition_of(context)
    if num_partitions != config.num_clients:
        raise InputError(f"num-partitions of this SuperNode ({num_partitions}) must equal "
                         f"num_clients (K = {config.num_clients}) of the run")
    t = int(msg.content["config"]["server-round"])
    mu = float(msg.content["terms"]["mu"])
    correction = msg.content["correction"].to_torch_state_dict() if "correction" in msg.content else None
    x_k, y_k = client_data(config, k)
    _, _, num_classes, input_shape = evaluation_data(config)
    model = build_model(config.model, num_classes, input_shape)
    torch.manual_seed(dropout_seed(config.seed, t, k))   # as fedlib's sequential engine
    result = local_update(model, x_k, y_k, weights=msg.content["arrays"].to_torch_state_dict(),
                          epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                          momentum=config.momentum, weight_decay=config.weight_decay,
                          generator=shuffle_generator(config.seed, t, k), mu=mu, correction=correction)
    metrics = MetricRecord({"train-loss": result.train_loss, "num-examples": result.num_examples,
                            "steps": result.steps})
    content = RecordDict({"arrays": ArrayRecord(result.weights), "metrics": metrics,
                          "client": ConfigRecord({"partition-id": k})})
    return Message(content=content, reply_to=msg)
