"""FedAvg on Flower (``flwr``): the same client and server, run by a real FL framework.

Install with ``pip install "fedlib[flower]"``. The modules mirror a Flower app:

- ``fedlib.flower.client_app``: the ClientApp, fedlib's ``local_update`` on one partition
- ``fedlib.flower.server_app``: the ServerApp: ``fedlib.run`` with its clients on the SuperNodes
- ``fedlib.flower.clients``: that backend: ClientUpdate sent to the SuperNodes of S_t
- ``fedlib.flower.task``: the run configuration as Flower records, and each client's data
- ``fedlib.flower.simulation``: many virtual clients in Flower's Simulation Runtime (Ray)
- ``fedlib.flower.deploy``: a SuperLink and real SuperNode processes on 127.0.0.1

``pyproject.toml`` in this folder is the Flower app's own configuration (``[tool.flwr.app]``),
which ``flwr run`` reads; it is not the package's.
"""
