"""The Flower ClientApp: ClientUpdate(k, w) of the paper, run by a SuperNode.

Every SuperNode (a real process in a deployment, a virtual one in simulation)
holds one client's partition; Flower tells it which through its node config
(``partition-id``, ``num-partitions``). For each training message the ClientApp

1. reads the global weights w_t (an ``ArrayRecord``) and the run's configuration
   (a ``ConfigRecord``: E, B, eta, the seed, the partition, and the round t that
   Flower's FedAvg adds as ``server-round``),
2. runs fedlib's :func:`~fedlib.client.local_update` unchanged on its n_k examples,
   shuffling with the same per-client, per-round seed as ``fedlib.run``,
3. replies with its new weights w_k, a ``MetricRecord`` holding n_k under the key
   ``num-examples`` (which Flower's FedAvg uses as the averaging weight) and the
   training loss, and a ``ConfigRecord`` saying which client k it is (kept out of the
   metrics, which Flower averages).
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One ClientUpdate(k, w_t) on this node's partition k."""
    # Many clients run side by side (Ray actors, SuperNodes): one thread each.
    set_threads(1)
    config = from_record(msg.content["config"])
    k = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", config.num_clients))
    if num_partitions != config.num_clients:
        raise InputError(f"num-partitions of this SuperNode ({num_partitions}) must equal "
                         f"num_clients (K = {config.num_clients}) of the run")
    t = int(msg.content["config"]["server-round"])
    x_k, y_k = client_data(config, k)
    _, _, num_classes, input_shape = evaluation_data(config)
    model = build_model(config.model, num_classes, input_shape)
    torch.manual_seed(dropout_seed(config.seed, t, k))   # as fedlib's sequential engine
    result = local_update(model, x_k, y_k, weights=msg.content["arrays"].to_torch_state_dict(),
                          epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                          momentum=config.momentum, weight_decay=config.weight_decay,
                          generator=shuffle_generator(config.seed, t, k))
    metrics = MetricRecord({"train-loss": result.train_loss, "num-examples": result.num_examples})
    content = RecordDict({"arrays": ArrayRecord(result.weights), "metrics": metrics,
                          "client": ConfigRecord({"partition-id": k})})
    return Message(content=content, reply_to=msg)
