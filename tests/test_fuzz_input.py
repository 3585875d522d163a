"""Property-based fuzzing (Hypothesis) of everything a user or a file hands fedlib: the command
line's flags, FedAvgConfig, fedavg, and the readers of histories, results and checkpoints.

The properties: nothing raises but the documented errors (InputError, or TypeError for a wrong
kind of argument to the Python API); the command line returns 0, 2 or 3 and writes one line for 2;
nothing outside a parameter's range is accepted, and what is accepted is usable (it fits the dtype
it is used in, it is saved as strict JSON and reads back as itself).

Deterministic for CI: ``derandomize=True`` draws the same examples on every run, and no example
database is kept. The number of examples per property is chosen so that this file runs in about
a minute on a 2-core machine (see EXAMPLES).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fedlib.runner
from fedlib import params as P
from fedlib.checkpoint import Checkpoint
from fedlib.cli import main
from fedlib.config import FedAvgConfig
from fedlib.files import to_json
from fedlib.metrics import History, RoundRecord
from fedlib.params import InputError
from fedlib.reproduce import check_result
from fedlib.strategies import fedavg

# Examples per property (Hypothesis' default is 100).
EXAMPLES = {"flags": 500, "parse": 1000, "config": 1000, "fedavg": 500, "history": 1000, "result": 500,
            "checkpoint": 300}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


# --- values of every kind a user can type or a program can pass ---------------------------------

NUMBER_TEXT = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e39", "1e308", "-0", "0.0", "3.4028235e38", "3.4028234e38", "1e-320", "1_000", "0x10",
                     " 7 ", "٣", "inf", "Infinity", "-inf", "nan", "none", "auto", "default", "all", "", "1e", "--",
                     "1" * 5000, "2147483648", str(2**63), str(2**63 - 1), str(2**31 - 1)]),
    st.text(max_size=12),
)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.fractions(max_denominator=10**6),
    st.integers(-2**40, 2**40).map(np.int64), st.floats(width=32).map(np.float32), st.booleans().map(np.bool_),
    st.lists(st.integers(), max_size=3), st.just(torch.tensor(0.5)),
)
CONFIG_FLAGS = [(f.name, f.metadata["flag"] or "--" + f.name.replace("_", "-"), f.metadata["range"])
                for f in fields(FedAvgConfig) if f.metadata["range"] is not None]
# The method whose knob a field is (a knob of another method is refused whatever its value).
METHOD_OF = {"mu": "fedprox", "server_lr": "fedadam", "server_momentum": "fedavgm", "server_beta1": "fedadam",
             "server_beta2": "fedadam", "server_tau": "fedadam", "dp_clip": "dp-fedavg", "dp_noise": "dp-fedavg"}


def in_range(allowed: P.Range):
    """Values inside a Range, of the types a program may hold them in."""
    if allowed.kind is int:
        values = st.integers(int(allowed.low), int(min(allowed.high or 2**40, 2**40)))
        return st.one_of(values, values.map(np.int64))
    low, high = allowed.low, allowed.high if allowed.high is not None else 1e300
    values = st.floats(low, high, exclude_min=allowed.low_open, exclude_max=allowed.high_open, allow_nan=False)
    return st.one_of(values, values.map(np.float64))


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture
def quick_runs(fake_data, monkeypatch):
    """The fake MNIST, and runs that stop before their first round (everything up to the training
    runs: parsing, validation, the data, the split, the memory check, the outputs). The thread count
    is checked but not applied (1024 threads would slow every later test of this process)."""
    monkeypatch.setattr(fedlib.runner, "rounds", lambda *args, **kwargs: iter(()))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    return fake_data


@fuzz("flags")
@given(choice=st.sampled_from(CONFIG_FLAGS + [("threads", "--threads", P.THREADS),
                                              ("checkpoint_every", "--checkpoint-every", P.CHECKPOINT_EVERY)]),
       data=st.data())
def test_any_flag_value_exits_0_or_2_with_one_line(quick_runs, capsys, choice, data):
    """Half the values are typed anyhow, half are in the flag's range (which then runs up to the
    training, where the split, the memory check and the model may still refuse them)."""
    name, flag, allowed = choice
    text = data.draw(st.one_of(NUMBER_TEXT, in_range(allowed).map(str)))
    argv = ["train", "--clients", "10", "--frac", "0.2", "--no-progress", "--device", "cpu",
            "--strategy", METHOD_OF.get(name, "fedavg"), f"{flag}={text}"]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    event(f"exit {code}")
    assert code in (0, 2), err
    if code == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@fuzz("parse")
@given(choice=st.sampled_from(CONFIG_FLAGS), text=NUMBER_TEXT)
def test_a_parsed_flag_is_in_its_range_and_fits_its_dtype(choice, text):
    """No silent acceptance: what a flag's Range parses is in the range, fits a C int64 (integers)
    or float32 (the rates and scales: every float knob but alpha and sigma, used in float64)."""
    name, _, allowed = choice
    try:
        value = allowed.parse(text)
    except InputError:
        return
    if value is None:
        assert allowed.none
        return
    assert allowed.contains(value) and type(value) is allowed.kind
    if allowed.kind is int:
        assert -2**63 <= value < 2**63
    elif name not in ("alpha", "sigma"):
        assert torch.tensor(value, dtype=torch.float32).isfinite()


# --- FedAvgConfig --------------------------------------------------------------------------------

@fuzz("config")
@given(choice=st.sampled_from(CONFIG_FLAGS), data=st.data())
def test_validate_accepts_exactly_the_values_in_range(choice, data):
    """A value inside the field's range is accepted and becomes a plain int or float that is saved
    as strict JSON; a value of another kind or outside the range is refused with InputError."""
    name, _, allowed = choice
    inside = data.draw(st.booleans())
    value = data.draw(in_range(allowed) if inside else ANY_VALUE)
    config = FedAvgConfig(strategy=METHOD_OF.get(name, "fedavg"), **{name: value})
    try:
        config.validate()
    except InputError as error:
        assert not allowed.contains(value), f"{name}={value!r} was refused: {error}"
        return
    assert allowed.contains(value), f"{name}={value!r} was accepted"
    saved = getattr(config, name)
    assert saved is None or type(saved) in (int, float)
    assert json.loads(to_json(asdict(config))) == asdict(config)


@fuzz("config")
@given(values=st.fixed_dictionaries({}, optional={f.name: ANY_VALUE for f in fields(FedAvgConfig)}))
def test_validate_raises_only_input_error(values):
    try:
        config = FedAvgConfig(**values).validate()
    except InputError:
        return
    to_json(asdict(config))                            # accepted: plain values, strict JSON


# --- fedavg --------------------------------------------------------------------------------------

WEIGHT = st.one_of(
    st.builds(lambda shape, dtype: torch.ones(shape, dtype=dtype), st.lists(st.integers(0, 3), max_size=2),
              st.sampled_from([torch.float32, torch.float64, torch.int64])),
    st.just(torch.ones(2).to_sparse()), st.just(torch.empty(2, device="meta")), st.just([1.0, 2.0]), st.none(),
)
STATE = st.dictionaries(st.sampled_from(["w", "b", "c"]), WEIGHT, max_size=3)
COUNT = st.one_of(st.integers(-3, 2**60), st.just(2**1100), st.floats(allow_nan=True, allow_infinity=True),
                  st.booleans(), st.integers(0, 100).map(np.int64), st.just("3"))


@fuzz("fedavg")
@given(weights=st.one_of(st.lists(STATE, max_size=4), STATE, st.just(torch.ones(3))),
       counts=st.one_of(st.lists(COUNT, max_size=4), st.just("12")))
def test_fedavg_raises_only_input_or_type_error_and_averages_what_it_accepts(weights, counts):
    try:
        average = fedavg(weights, counts)
    except (InputError, TypeError):
        return
    assert sum(int(n) for n in counts) > 0 and all(P.NUM_EXAMPLES.contains(n) for n in counts)
    for name, value in average.items():                 # every client's weights are ones: so is their average
        assert value.shape == weights[0][name].shape and value.dtype == weights[0][name].dtype
        assert torch.allclose(value, torch.ones_like(value))


# --- the readers of histories and results ----------------------------------------------------------

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=6)),
                    lambda children: st.one_of(st.lists(children, max_size=4),
                                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
                    max_leaves=20)


def a_history() -> dict:
    records = [RoundRecord(t, [0, 3], 0.5 + t / 10, 1.0, 1.2, 0.1, 100 * t) for t in (1, 2, 3)]
    return History(asdict(FedAvgConfig(num_clients=10, rounds=3)), records).to_dict()


def mutated(data, value, path_choice: int):
    """``data`` with one place (chosen by path_choice among all its places) set to ``value``."""
    places = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                places.append(path + [key])
                walk(child, path + [key])
        elif isinstance(node, list):
            for i, child in enumerate(node):
                places.append(path + [i])
                walk(child, path + [i])
    walk(data, [])
    *parents, last = places[path_choice % len(places)]
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


@fuzz("history")
@given(value=JSON, where=st.integers(0, 10**6), whole=st.booleans())
def test_the_history_reader_raises_only_input_error(tmp_path_factory, value, where, whole):
    data = value if whole else mutated(a_history(), value, where)
    path = tmp_path_factory.mktemp("h") / "h.json"
    path.write_text(json.dumps(data))
    try:
        history = History.load(path)
    except InputError:
        return
    records = json.loads(to_json(history.to_dict()))["records"]          # accepted: strict JSON again
    assert [r["round"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["test_accuracy"] is None or 0 <= r["test_accuracy"] <= 1 for r in records)


@pytest.fixture(scope="module")
def a_result(tmp_path_factory) -> dict:
    from fedlib import reproduce as R
    from tests.helpers import write_fake_mnist

    root = tmp_path_factory.mktemp("result")
    write_fake_mnist(root / "data", n_train=200, n_test=50)
    setting = next(s for s in R.paper_settings("1") if s.name == "2nn-iid-C0.1-E1-B10")
    data = fedlib.load_dataset("mnist", root=root / "data", device="cpu", download=False)
    return R.sweep([(setting, 0.1, 0)], root / "out", device="cpu", max_rounds=1, data=data, progress=False)[0]


@fuzz("result")
@given(value=JSON, where=st.integers(0, 10**6))
def test_the_result_reader_raises_only_input_error(a_result, value, where):
    data = mutated(json.loads(json.dumps(a_result)), value, where)
    try:
        checked = check_result(data)
    except InputError:
        return
    assert checked["reached"] == (checked["rounds_to_target"] is not None)
    assert checked["lr"] == checked["history"]["config"]["lr"] and not isinstance(checked["lr"], bool)


# --- the checkpoint reader -------------------------------------------------------------------------

TORCH_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=4),
              st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype), st.lists(st.integers(0, 3), max_size=2),
                        st.sampled_from([torch.float32, torch.float64, torch.int32, torch.bool, torch.complex64])),
              st.just(torch.zeros(3).to_sparse()), st.just(torch.full((2,), math.nan))),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-2, 12)), children, max_size=3)),
    max_leaves=12)


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory):
    """A real checkpoint of a 2-round SCAFFOLD run on a small dataset, and its config and w_0."""
    from tests.helpers import small_data

    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    config = FedAvgConfig(num_clients=4, frac=0.5, rounds=2, strategy="scaffold", device="cpu")
    history = fedlib.run(config, small_data(), progress=False, checkpoint=path)
    assert len(history.records) == 2
    job = fedlib.Job(config, small_data())
    return path.read_bytes(), config, job.w_0


@fuzz("checkpoint")
@given(value=TORCH_VALUE, where=st.integers(0, 10**6), whole=st.booleans())
def test_the_checkpoint_reader_raises_only_input_error(tmp_path_factory, a_checkpoint, value, where, whole):
    raw, config, w_0 = a_checkpoint
    saved = torch.load(io.BytesIO(raw), weights_only=True)
    data = value if whole else mutated(saved, value, where)
    path = tmp_path_factory.mktemp("c") / "run.ckpt"
    buffer = io.BytesIO()
    torch.save(data, buffer)
    path.write_bytes(buffer.getvalue())
    checkpoint = Checkpoint(path, config)
    try:
        weights, history, state = checkpoint.load(w_0)
        fedlib.strategies.build(config, w_0).load_state_dict(state)
    except InputError:
        return
    assert all(torch.isfinite(w).all() and w.shape == w_0[name].shape for name, w in weights.items())
    assert len(history.records) <= config.rounds
