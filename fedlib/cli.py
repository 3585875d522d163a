"""The command line: ``python -m fedlib train|plot|reproduce``.

    python -m fedlib train --model 2nn --partition iid --rounds 20 --out runs/iid.json
    python -m fedlib train --model cnn --partition shards --epochs 5 --batch-size 10 --target 0.99
    python -m fedlib plot runs/iid.json runs/shards.json --out curves.png

The flags of ``train`` are built from the fields of :class:`~fedlib.config.FedAvgConfig`
(their help, defaults and ranges), so the command line accepts exactly what the library
does. Every command ends with one of these exit statuses, and with one line on stderr for
each but 0 and 3:

- 0: done;
- 1: the environment failed, not the input: a missing dataset (the line says where to put it),
  or an output that could not be written after the training (a full disk: the line says where
  the run was kept, its checkpoint, and how to write the output again);
- 2: bad input: a flag, a value, a file given or found (a history, a result, a checkpoint, a
  dataset), an output path, or a run too large for the memory; nothing was trained or written;
- 3: ``train`` ran, but its training diverged (a loss or the model is not a finite number): the
  summary line says so and that its accuracy means nothing, the history (if saved) says
  ``"diverged": true`` with its non-finite losses as null;
- 130: interrupted (Ctrl-C or SIGTERM, at any moment, imports included): the run's checkpoint,
  if it has one, was saved, and the line says how to resume.

Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from fedlib import params as P
from fedlib.checkpoint import CHECKPOINT_EVERY
from fedlib.config import FIELD_DEFAULTS, FedAvgConfig, saved_config
from fedlib.data import DatasetNotFoundError
from fedlib.files import check_folder, check_output
from fedlib.metrics import History, rounds_to_target
from fedlib.params import InputError
from fedlib.runtime import DEVICES, signals_held


class UsageError(Exception):
    """A bad flag or value: reported in one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (the default prints the usage too)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def flag_type(allowed: P.Range):
    """An argparse type that parses a flag with its parameter's Range."""
    def parse(text: str):
        try:
            return allowed.parse(text)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = allowed.kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per FedAvgConfig field, from the field's metadata."""
    for f in fields(FedAvgConfig):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        elif meta["choices"] is not None:
            parser.add_argument(flag, dest=f.name, choices=meta["choices"], default=default,
                                help=f"{meta['help']} (default %(default)s)")
        else:
            allowed = meta["range"]
            shown = allowed.none_words[0] if default is None and allowed.none else default
            if f.name == "num_clients":     # resolved by default_num_clients once the dataset is known
                default, shown = None, f"{shown}; for shakespeare, its number of speaking roles"
            parser.add_argument(flag, dest=f.name, type=flag_type(allowed), default=default,
                                metavar=allowed.symbol.upper() or None,
                                help=f"{meta['help']}; {allowed.describe(none_word=allowed.none_words[0])}"
                                     f"{allowed.limit_text()} (default {shown})")


def default_num_clients(dataset: str) -> int:
    """K when --clients is not given: Shakespeare's number of roles (its split by role and the paper's
    IID version of it have that many clients), else FedAvgConfig's default."""
    if dataset == "shakespeare":
        from fedlib.shakespeare import counts
        return counts()["clients"]
    return FIELD_DEFAULTS["num_clients"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedlib", description="Federated Averaging (McMahan et al. 2017) on MNIST and friends.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="run FedAvg and save its history as JSON")
    add_config_flags(train)
    train.add_argument("--out", default=None, help="where to save the history (JSON)")
    train.add_argument("--checkpoint", default=None,
                       help="save the run to this file as it goes, and resume from it if it exists")
    train.add_argument("--checkpoint-every", type=flag_type(P.CHECKPOINT_EVERY), default=CHECKPOINT_EVERY,
                       help="rounds between checkpoints (default %(default)s; also saved at the end and on Ctrl-C)")
    train.add_argument("--threads", type=flag_type(P.THREADS), default=None, help="CPU threads for torch")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    plot = commands.add_parser("plot", help="draw test accuracy per round of saved runs into a PNG")
    plot.add_argument("runs", nargs="+", help="history JSON files written by 'train --out'")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    plot.add_argument("--target", type=flag_type(P.TARGET), default=None,
                      help="draw a horizontal line at this accuracy")
    plot.add_argument("--title", default="Test accuracy per round")

    from fedlib.reproduce import DATASET_OF, TABLES

    rep = commands.add_parser("reproduce", help="run the paper's tables (resumable) or compare with them")
    rep.add_argument("--table", choices=TABLES, default=None,
                     help="Table 1 (effect of C), 2 (effect of E, B: the MNIST CNN and the Shakespeare LSTM), "
                          "2-reduced (Table 2's LSTM rows at a size a CPU can run), the ablation of our 2NN's gap to "
                          "the paper, or beyond (lesson 8's tuned methods) (required, except with --list, which then "
                          "lists all)")
    rep.add_argument("--model", choices=tuple(DATASET_OF), default=None, help="only this model's rows")
    rep.add_argument("--partition", choices=("iid", "shards", "natural"), default=None,
                     help="only IID, or only non-IID (shards on MNIST, natural: Shakespeare's split by role)")
    rep.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these settings (see --list)")
    rep.add_argument("--lr", nargs="+", type=flag_type(P.LR), default=None,
                     help="learning rates to try (default: each setting's grid)")
    rep.add_argument("--seeds", nargs="+", type=flag_type(P.SEED), default=None,
                     help="seeds to run or list (default: 0 for Tables 1 and 2, the ablation's planned seeds; "
                          "--list without --table shows every planned seed)")
    rep.add_argument("--max-rounds", type=flag_type(P.ROUNDS), default=None, help="a lower round cap (quick checks)")
    rep.add_argument("--out", default=None, help="one JSON file per run (default results/reproduce for "
                                                 "Tables 1 and 2, results/shakespeare for Table 2's LSTM rows, "
                                                 "results/shakespeare-reduced for 2-reduced, results/ablation "
                                                 "for the ablation, results/beyond for beyond)")
    rep.add_argument("--device", choices=DEVICES, default="auto")
    rep.add_argument("--together", choices=("auto", "on", "off"), default="auto",
                     help="train the runs that share the model, the data and the local training as one batch "
                          "(fedlib.run_many), equal to one at a time up to float rounding (default auto: on a GPU only)")
    rep.add_argument("--threads", type=flag_type(P.THREADS), default=None, help="CPU threads for torch")
    rep.add_argument("--list", action="store_true", help="list the runs and whether each is done, then exit")
    rep.add_argument("--summary", action="store_true", help="compare saved results with the paper, then exit")
    rep.add_argument("--no-progress", action="store_true")
    return parser


def _reproduce(args: argparse.Namespace) -> int:
    from fedlib import reproduce as R
    from fedlib.files import WriteError
    from fedlib.runtime import set_threads

    tables = R.TABLES if args.table is None else (args.table,)
    if args.table is None and not args.list:
        raise UsageError("fedlib reproduce: --table is required (" + ", ".join(R.TABLES) + "), except with --list")
    if args.summary:
        datasets = [DATASET_OF[args.model]] if args.model else _datasets(R, args.table)
        for dataset in datasets:                   # Table 2: each half against its own FedSGD row
            out = _out_folder(R, args, dataset=dataset)
            names = {s.name for s in R.select(R.settings_of(args.table), args.model, args.partition, args.only)}
            for row in R.comparison_rows(args.table, out, (args.seeds or [0])[0], dataset):
                if row["setting"] in names:
                    ratio = "" if row["ratio"] is None else f"  ours/paper {row['ratio']:.2f}"
                    ours = f"{row['ours']:.1f}" if isinstance(row["ours"], float) else row["ours"]
                    print(f"{row['setting']:40s} paper {str(row['paper'] or '--'):>5s}  ours {ours}{ratio}")
        return 0
    if args.list:
        seen: set = set()
        for table in tables:                       # each table's runs, done and pending, folder by folder
            for dataset in _datasets(R, table):
                out = _out_folder(R, args, table, dataset)
                if len(tables) > 1:
                    print(f"# table {table} ({out})")
                counts = _list_runs(R, _jobs(R, table, out, args, dataset), out, seen)
                if len(tables) > 1:
                    print("# " + ", ".join(f"{n} {status}" for status, n in counts.items()))
        return 0
    set_threads(args.threads)
    together = {"auto": None, "on": True, "off": False}[args.together]      # None: on a GPU only
    for dataset in _datasets(R, args.table):
        out = _out_folder(R, args, dataset=dataset)
        jobs = _jobs(R, args.table, out, args, dataset)
        if not jobs:
            continue
        check_folder(out)
        while True:
            try:
                results = R.sweep(jobs, out, args.device, args.max_rounds, progress=not args.no_progress,
                                  together=together)
            except WriteError as error:
                raise OutputLost(f"{error}; every finished run keeps its checkpoint in {Path(out) / '.checkpoints'}: "
                                 "free some space and run the same command again, which writes their results "
                                 "without training them again") from None
            more = _jobs(R, args.table, out, args, dataset) if args.table == "beyond" else jobs   # lesson 8's grows
            if len(more) == len(jobs):
                break
            jobs = more
        reached = sum(r["reached"] for r in results)
        print(f"{len(results)} runs in {out}: {reached} reached their target")
    return 0


def _out_folder(R, args: argparse.Namespace, table: str | None = None, dataset: str = "mnist") -> str:
    """--out, or the table's default folder for ``dataset`` (Table 2's Shakespeare rows have their own);
    an empty name is refused (it is not a folder)."""
    if args.out is not None and not args.out:
        raise InputError("--out must name a folder, got an empty name")
    return args.out or R.default_out(table or args.table, dataset)


def _datasets(R, table: str) -> list[str]:
    """The datasets of a table's settings, in order (Table 2: MNIST, then Shakespeare)."""
    return list(dict.fromkeys(s.dataset for s in R.settings_of(table)))


def _jobs(R, table: str, out: str, args: argparse.Namespace, dataset: str | None = None) -> list:
    """The runs of ``table`` the flags ask for: its plan (on ``dataset`` only, if given), filtered by
    --model, --partition, --only, --lr and --seeds (a rate or seed outside the plan is run too, as an extra)."""
    known = {s.name for s in R.settings_of(table)} | {s.name for s, _, _ in R.plan(table, out)}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        raise InputError(f"--only must name settings of table {table}, got unknown {unknown}; "
                         "see 'python -m fedlib reproduce --list'")
    settings = {s.name: s for s, _, _ in R.plan(table, out) if dataset is None or s.dataset == dataset}
    only = [name for name in args.only if name in settings] if args.only else None
    if args.only and not only:                     # --only names settings of the table's other dataset
        return []
    settings = R.select(list(settings.values()), args.model, args.partition, only)
    if args.lr or args.seeds:
        planned = R.jobs_of(settings, args.lr, args.seeds) if table != "beyond" else \
            [(s, lr, seed) for s in settings for lr in (args.lr or s.learning_rates())
             for seed in (args.seeds or R.BEYOND_SEEDS + R.BEYOND_FRESH)]
        return planned
    names = {s.name for s in settings}
    return [job for job in R.plan(table, out) if job[0].name in names and (dataset is None or job[0].dataset == dataset)]


def _list_runs(R, jobs: list, out: str, seen: set) -> dict[str, int]:
    """One line per planned run (done, pending or corrupt), then the saved runs outside the plan
    (extra); a run that two tables share is listed once. Returns the count of each status."""
    counts = {"done": 0, "pending": 0, "corrupt": 0, "extra": 0}
    planned = set()
    for setting, lr, seed in jobs:
        run_id = R.run_id(setting, lr, seed)
        planned.add(run_id)
        if (out, run_id) in seen:
            continue
        seen.add((out, run_id))
        status = R.run_status(setting, lr, seed, out)
        counts[status] += 1
        print(f"{status:8s}{run_id}  (cap {setting.round_cap} rounds)")
    for name in sorted({setting.name for setting, _, _ in jobs}):
        for path in sorted(Path(out).glob(f"{name}-lr*.json")):
            if path.stem not in planned and (out, path.stem) not in seen:
                seen.add((out, path.stem))
                counts["extra"] += 1
                print(f"{'extra':8s}{path.stem}  (saved, outside the plan)")
    return counts


# Exit statuses (see the module docstring).
DONE, FAILED, BAD_INPUT, DIVERGED, INTERRUPTED = 0, 1, 2, 3, 130


class OutputLost(Exception):
    """An output could not be written after the work was done: one line, exit status 1."""


def _train(args: argparse.Namespace) -> int:
    from fedlib.files import WriteError
    from fedlib.runner import run
    from fedlib.runtime import set_threads

    set_threads(args.threads)
    if args.num_clients is None:
        args.num_clients = default_num_clients(args.dataset)
    config = FedAvgConfig(**{f.name: getattr(args, f.name) for f in fields(FedAvgConfig)}).validate()
    checkpoint = None if args.checkpoint is None else check_output(args.checkpoint, what="--checkpoint")
    if args.out is not None:                         # refused now, not after the training
        out = check_output(args.out, what="--out")
        if out == checkpoint:
            raise InputError("--out and --checkpoint must be different files")
    kept = (f"the run is kept in {args.checkpoint}: free some space and run the same command again, which "
            "resumes there" if args.checkpoint else "the run was not kept (--checkpoint FILE keeps a run through "
                                                    "this)")
    if config.dataset == "shakespeare":              # what the parse of the plays yields, beside the paper
        from fedlib.shakespeare import describe_counts
        print(describe_counts(), flush=True)
    try:
        history = run(config, progress=not args.no_progress, checkpoint=args.checkpoint,
                      checkpoint_every=args.checkpoint_every)
    except WriteError as error:                      # the checkpoint, during the training
        raise OutputLost(f"{error}; the training stopped, " + (
            f"and {args.checkpoint} holds the run as it was last saved: free some space and run the same "
            "command again to go on from there" if args.checkpoint else "and nothing was kept")) from None
    if args.out is not None:
        try:
            history.save(args.out)
        except WriteError as error:
            raise OutputLost(f"{error}; {kept} and only writes {args.out}" if args.checkpoint
                             else f"{error}; {kept}") from None
    print(summary(history, config) + (f", saved {args.out}" if args.out is not None else ""))
    return DIVERGED if history.diverged else DONE


def summary(history: History, config: FedAvgConfig) -> str:
    """One line: the final and best accuracy, rounds to the target, time; for a run whose training
    diverged, that it did, in which round, and the best accuracy before it."""
    if history.diverged:
        last, before = history.records[-1], History(history.config, history.records[:-1])
        text = (f"training DIVERGED in round {last.round} (a loss or the model is not a finite number): the "
                f"result cannot be trusted and its accuracy means nothing; ")
        text += (f"best accuracy before it {before.best_accuracy:.4f} (round "
                 f"{before.rounds[before.accuracies.index(before.best_accuracy)]})" if before.accuracies
                 else "no round before it was evaluated")
        return text + f"; smaller steps (lr = {config.lr:g}, or the method's server step) usually help, " \
                      f"{history.seconds:.1f} s"
    if history.accuracies:
        best_round = history.rounds[history.accuracies.index(history.best_accuracy)]
        text = (f"final accuracy {history.final_accuracy:.4f}, best {history.best_accuracy:.4f} "
                f"(round {best_round}) after {len(history.records)} rounds")
    else:
        text = f"no round evaluated in {len(history.records)} rounds"
    if config.target is not None:
        needed = rounds_to_target(history, config.target)
        text += f", rounds to {config.target:g}: " + ("not reached" if needed is None else f"{needed:.1f}")
    return text + f", {history.seconds:.1f} s"


def _plot(args: argparse.Namespace) -> int:
    from fedlib.files import WriteError
    from fedlib.plotting import save_accuracy_plot

    histories = [load_history(path) for path in args.runs]
    if args.labels is not None and len(args.labels) != len(histories):
        raise InputError(f"--labels must give one label per run ({len(histories)}), got {len(args.labels)}")
    check_output(args.out, inputs=tuple(args.runs), what="--out")
    try:
        save_accuracy_plot(histories, args.out, args.labels, target=args.target, title=args.title)
    except WriteError as error:
        raise OutputLost(f"{error}; nothing else was changed: free some space and run the same command again") from None
    print(f"wrote {args.out}")
    return 0


def load_history(path: str) -> History:
    """A history file given to ``plot``, checked whole: its fields (:meth:`History.load`) and its
    configuration (a FedAvgConfig of a run)."""
    history = History.load(path)
    try:
        saved_config(history.config)
    except InputError as error:
        raise InputError(f"not a fedlib history file: {path} (its config: {error})") from None
    return history


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, terminate=_interrupt) -> int:
    """Entry point; returns the exit status (module docstring: 0 done, 1 the environment failed,
    2 bad input, 3 the training diverged, 130 interrupted). terminate: SIGTERM's handler while it
    runs, one that raises KeyboardInterrupt (``fedlib.__main__`` passes one that also ignores every
    signal after the first)."""
    command = "fedlib"
    previous = signal.signal(signal.SIGTERM, terminate)      # stop like Ctrl-C: save, then exit 130
    try:
        try:
            args = build_parser().parse_args(argv)
            command = f"fedlib {args.command}"
            return {"train": _train, "plot": _plot, "reproduce": _reproduce}[args.command](args)
        except KeyboardInterrupt as stop:                     # RunInterrupted says what was saved
            with signals_held():
                runner = sys.modules.get("fedlib.runner")
                text = str(stop) if runner and isinstance(stop, runner.RunInterrupted) else "interrupted"
                print(f"{command}: {text}", file=sys.stderr)
            return INTERRUPTED
    except UsageError as error:
        print(error, file=sys.stderr)
        return BAD_INPUT
    except InputError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return BAD_INPUT
    except (DatasetNotFoundError, OutputLost) as error:
        print(error if isinstance(error, DatasetNotFoundError) else f"{command}: {error}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:                                 # a second Ctrl-C while the first was reported
        return INTERRUPTED
    except BrokenPipeError:                                   # e.g. `... --list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        signal.signal(signal.SIGTERM, previous)
