"""The command line: ``python -m fedlib train ...`` and ``python -m fedlib plot ...``.

    python -m fedlib train --model 2nn --partition iid --rounds 20 --out runs/iid.json
    python -m fedlib train --model cnn --partition shards --epochs 5 --batch-size 10 --target 0.99
    python -m fedlib plot runs/iid.json runs/shards.json --out curves.png

Bad flags or values exit with status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from fedlib.data import DATASETS, DatasetNotFoundError
from fedlib.metrics import History, rounds_to_target
from fedlib.models import MODELS
from fedlib.partition import PARTITIONS
from fedlib.server import ENGINES, FedAvgConfig


class UsageError(Exception):
    """A bad flag or value: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):            # argparse's default prints the usage too
        raise UsageError(f"{self.prog}: {message}")


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: a number of ``kind`` in [low, high] (or (low, high] with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _batch_size(text: str) -> int | None:
    """B: a positive integer, or ``inf`` / ``all`` for B = infinity (the whole local set)."""
    if text.lower() in ("inf", "infinity", "all", "none"):
        return None
    return _number(int, 1)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlib", description="Federated Averaging (McMahan et al. 2017) on MNIST and friends.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="run FedAvg and save its history as JSON")
    d = FedAvgConfig()
    train.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    train.add_argument("--model", choices=tuple(MODELS), default=d.model)
    train.add_argument("--partition", choices=PARTITIONS, default=d.partition)
    train.add_argument("--clients", dest="num_clients", type=_number(int, 1), default=d.num_clients,
                       help="K, the number of clients (default %(default)s)")
    train.add_argument("--frac", type=_number(float, 0, 1), default=d.frac,
                       help="C, the fraction of clients per round; 0 means one client (default %(default)s)")
    train.add_argument("--epochs", dest="local_epochs", type=_number(int, 1), default=d.local_epochs,
                       help="E, local epochs per round (default %(default)s)")
    train.add_argument("--batch-size", type=_batch_size, default=d.batch_size,
                       help="B, local minibatch size, or 'inf' for the whole local set (default %(default)s)")
    train.add_argument("--lr", type=_number(float, 0, low_open=True), default=d.lr, help="eta, the learning rate")
    train.add_argument("--rounds", type=_number(int, 1), default=d.rounds)
    train.add_argument("--seed", type=_number(int, 0), default=d.seed, help="the one seed of the run")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    train.add_argument("--engine", choices=ENGINES, default=d.engine,
                       help="vectorized trains a round's clients together, sequential one after another "
                            "(same weights); auto picks the faster (sequential for the paper's CNN on a CPU)")
    train.add_argument("--eval-every", type=_number(int, 1), default=d.eval_every)
    train.add_argument("--momentum", type=_number(float, 0, 0.999), default=d.momentum)
    train.add_argument("--weight-decay", type=_number(float, 0), default=d.weight_decay)
    train.add_argument("--shards-per-client", type=_number(int, 1), default=d.shards_per_client)
    train.add_argument("--shard-size", type=_number(int, 1), default=d.shard_size,
                       help="default: training examples / (clients * shards per client)")
    train.add_argument("--alpha", type=_number(float, 0, low_open=True), default=d.alpha,
                       help="Dirichlet concentration (partition dirichlet)")
    train.add_argument("--min-size", type=_number(int, 0), default=d.min_size,
                       help="smallest client (partitions dirichlet and unbalanced)")
    train.add_argument("--sigma", type=_number(float, 0), default=d.sigma,
                       help="lognormal spread of client sizes (partition unbalanced)")
    train.add_argument("--target", type=_number(float, 0, 1, low_open=True), default=None,
                       help="report the rounds needed to reach this test accuracy")
    train.add_argument("--stop-at-target", action="store_true", help="stop once --target is reached")
    train.add_argument("--out", default=None, help="where to save the history (JSON)")
    train.add_argument("--checkpoint", default=None, help="save/resume the run from this file")
    train.add_argument("--threads", type=_number(int, 1), default=None, help="CPU threads for torch")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    plot = commands.add_parser("plot", help="draw test accuracy per round of saved runs into a PNG")
    plot.add_argument("runs", nargs="+", help="history JSON files written by 'train --out'")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    plot.add_argument("--target", type=_number(float, 0, 1, low_open=True), default=None,
                      help="draw a horizontal line at this accuracy")
    plot.add_argument("--title", default="Test accuracy per round")
    rep = commands.add_parser("reproduce", help="run the paper's MNIST tables (resumable) or compare with them")
    rep.add_argument("--table", choices=("1", "2"), required=True, help="Table 1 (effect of C) or 2 (effect of E, B)")
    rep.add_argument("--model", choices=("2nn", "cnn"), default=None, help="only this model's rows")
    rep.add_argument("--partition", choices=("iid", "shards"), default=None, help="only IID or only non-IID")
    rep.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these settings (see --list)")
    rep.add_argument("--lr", nargs="+", type=_number(float, 0, low_open=True), default=None,
                     help="learning rates to try (default: each setting's grid)")
    rep.add_argument("--seeds", nargs="+", type=_number(int, 0), default=[0])
    rep.add_argument("--max-rounds", type=_number(int, 1), default=None, help="a lower round cap (quick checks)")
    rep.add_argument("--out", default="results/reproduce", help="one JSON file per run (default %(default)s)")
    rep.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    rep.add_argument("--threads", type=_number(int, 1), default=None, help="CPU threads for torch")
    rep.add_argument("--list", action="store_true", help="list the runs and whether each is done, then exit")
    rep.add_argument("--summary", action="store_true", help="compare saved results with the paper, then exit")
    rep.add_argument("--no-progress", action="store_true")
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlib import reproduce as R
    from fedlib.runtime import set_threads

    settings = R.select(R.paper_settings(args.table), args.model, args.partition, args.only)
    if args.summary:
        for row in R.comparison_rows(args.table, args.out, args.seeds[0]):
            if row["setting"] in {s.name for s in settings}:
                ratio = "" if row["ratio"] is None else f"  ours/paper {row['ratio']:.2f}"
                ours = f"{row['ours']:.1f}" if isinstance(row["ours"], float) else row["ours"]
                print(f"{row['setting']:32s} paper {str(row['paper'] or '--'):>5s}  ours {ours}{ratio}")
        return 0
    if args.list:
        for s in settings:
            for lr in args.lr or s.learning_rates():
                for seed in args.seeds:
                    done = (Path(args.out) / f"{R.run_id(s, lr, seed)}.json").exists()
                    print(f"{'done   ' if done else 'pending'} {R.run_id(s, lr, seed)}  (cap {s.round_cap} rounds)")
        return 0
    set_threads(args.threads)
    results = R.sweep(settings, args.out, args.lr, args.seeds, args.device, args.max_rounds,
                      progress=not args.no_progress)
    reached = sum(r["reached"] for r in results)
    print(f"{len(results)} runs in {args.out}: {reached} reached their target")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fedlib.runtime import set_threads
    from fedlib.server import run

    set_threads(args.threads)
    names = {f.name for f in fields(FedAvgConfig)}
    config = FedAvgConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()
    history = run(config, progress=not args.no_progress, checkpoint=args.checkpoint)
    if args.out:
        history.save(args.out)
    best_round = history.rounds[history.accuracies.index(history.best_accuracy)]
    summary = (f"final accuracy {history.final_accuracy:.4f}, best {history.best_accuracy:.4f} "
               f"(round {best_round}) after {len(history.records)} rounds")
    if config.target is not None:
        needed = rounds_to_target(history, config.target)
        summary += f", rounds to {config.target:g}: " + ("not reached" if needed is None else f"{needed:.1f}")
    summary += f", {history.seconds:.1f} s"
    if args.out:
        summary += f", saved {args.out}"
    print(summary)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fedlib.plotting import save_accuracy_plot

    histories = []
    for path in args.runs:
        try:
            histories.append(History.load(path))
        except FileNotFoundError:
            raise UsageError(f"fedlib plot: no such run file: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UsageError(f"fedlib plot: not a fedlib history file: {path}") from None
    save_accuracy_plot(histories, args.out, args.labels, target=args.target, title=args.title)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 missing data, 2 bad usage)."""
    try:
        args = build_parser().parse_args(argv)
        return {"train": _train, "plot": _plot, "reproduce": _reproduce}[args.command](args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"fedlib {args.command}: {error}", file=sys.stderr)
        return 2
    except DatasetNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
