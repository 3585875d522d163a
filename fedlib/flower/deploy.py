"""A real Flower federation on this machine: one SuperLink, several SuperNodes, one run.

    python -m fedlib.flower.deploy --supernodes 3 --rounds 2

starts, as separate processes on 127.0.0.1 (free ports chosen at start):

1. ``flower-superlink --insecure``: the server side, which hosts the ServerApp;
2. ``flower-supernode --insecure --node-config "partition-id=k num-partitions=K"``
   for k = 0, 1, ...: each holds client k's partition of fedlib's split of MNIST;
3. ``flwr run <app> --stream``: submits the app (``pyproject.toml`` of this folder)
   to the SuperLink and prints its log until the run ends;

then stops every process it started. Each process is started in its own process
group, and all groups are terminated (SIGTERM, then SIGKILL after a grace period)
whatever happens: normal end, an error, Ctrl-C or SIGTERM to this script. All
Flower state (``FLWR_HOME``: its configuration, installed app bundles) lives in a
temporary folder that is removed at the end, so nothing is left behind.

``--stop-in-round R`` stops SuperNode 0 (SIGTERM to its process group) as soon as
round R has begun, while its clients train, to show what happens to a round when a
client goes away. ``--log summary`` prints only the lines that say what happened, with
ports and paths replaced by placeholders, so that the output is the same from run
to run except for the timings ("took ... s").

This is a teaching setup on one machine: every process runs with ``--insecure`` (no
TLS: the weights travel unencrypted, over 127.0.0.1 only) and the SuperLink accepts
any SuperNode (no authentication). A federation across machines turns both on:
``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
server.key --enable-supernode-auth`` and ``flower-supernode --root-certificates ca.crt
--auth-supernode-private-key node.key`` (each SuperNode's public key registered with the
Flower CLI first); see Flower's guides "Enable TLS connections" and "Authenticate
SuperNodes".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlib import params as P
from fedlib.config import FedAvgConfig
from fedlib.flower.task import to_record
from fedlib.metrics import History
from fedlib.params import InputError

APP_PYPROJECT = Path(__file__).with_name("pyproject.toml")
CONNECTION = "fedlib-local"
LOG_LEVELS = ("all", "summary", "none")
# Seconds a deployed run may take: the SuperLink alone takes a few to start, and a day is far beyond
# any run of this teaching setup (and within what Python's timeouts take: threading.TIMEOUT_MAX).
TIMEOUT = P.Range(float, 1, 86400)
# The lines --log summary keeps of the run's log: what each round did, printed by the ServerApp
# (fedlib.flower.clients and server_app: "round t: S_t has ...", "round t: N updates came back ...").
SUMMARY_LINE = re.compile(r"^round \d+:")


TOML_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_run_config(values: dict[str, object]) -> str:
    """A Flower run config as a TOML document, every value quoted or escaped as TOML requires.

    ``flwr run --run-config 'k=v ...'`` splits its string with a regular expression that
    cannot carry a quote inside a value, so the run config is handed over as a file.
    """
    lines = []
    for key, value in values.items():
        if not TOML_KEY.fullmatch(key):
            raise InputError(f"run config keys must be letters, digits, - and _, got {key!r}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InputError(f"run config value {key} must be finite, got {value}")
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)          # a TOML basic string: quotes and backslashes escaped
        else:
            raise InputError(f"run config value {key} must be a bool, int, float or str, got {type(value).__name__}")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until ``process`` accepts TCP connections on ``port``; raise if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployFailed(f"{Path(process.args[0]).name} exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployFailed(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class DeployResult:
    """What a deployed run produced: its History, its log, and how long things took.

    startup_seconds: from launching the SuperLink to its API answering.
    run_seconds: from ``flwr run`` to the end of the run (app bundle, SuperNode
        connection, every round). stopped: the SuperNodes stopped on purpose.
    """

    history: History
    log: list[str]
    startup_seconds: float
    run_seconds: float
    stopped: list[int] = field(default_factory=list)


class LocalFederation:
    """A SuperLink and ``num_supernodes`` SuperNodes as processes on 127.0.0.1.

    Use as a context manager: every process is stopped and the working folder
    removed on exit, also after an exception or Ctrl-C.

    num_supernodes: how many SuperNodes (clients) to start; SuperNode k holds
        partition k of a K-client split. num_clients: K (default: num_supernodes).
    log: what to print: ``all`` (every command and log line), ``summary`` (commands
        and the lines that say what happened, ports and paths as placeholders), ``none``.
    """

    def __init__(self, num_supernodes: int, num_clients: int | None = None, grace: float = 10.0,
                 log: str = "all") -> None:
        num_clients = num_supernodes if num_clients is None else num_clients
        P.Range(int, 1).check("num_supernodes", num_supernodes)
        if num_clients < num_supernodes:
            raise InputError(f"num_clients (K) must be >= num_supernodes ({num_supernodes}), got {num_clients}")
        if log not in LOG_LEVELS:
            raise InputError(f"log must be one of {LOG_LEVELS}, got {log!r}")
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="fedlib-flower-"))
        self.placeholders: dict[str, str] = {str(self.workdir): "<tmp>"}
        self.num_supernodes = num_supernodes
        self.num_clients = num_clients
        self.grace = grace
        self.processes: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.startup_seconds = 0.0
        bin_dir = str(Path(sys.executable).parent)
        # The Flower executables (flower-superexec, flwr-serverapp, ...) start each other by name.
        self.env = {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}

    def command(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def say(self, line: str, flower: bool = False) -> None:
        """Print one line as ``log`` says; ``flower``: a line of Flower's own run log."""
        if self.log == "none" or (self.log == "summary" and flower and not SUMMARY_LINE.search(line)):
            return
        if self.log == "summary":
            for value, name in self.placeholders.items():
                line = line.replace(value, name)
            line = re.sub(r"node \d+", "node <id>", line)
        print(line, flush=True)

    def _spawn(self, key: str, args: list[str]) -> subprocess.Popen:
        self.say("$ " + " ".join([Path(args[0]).name] + [a if " " not in a else f'"{a}"' for a in args[1:]]))
        with open(self.workdir / f"{key}.log", "w") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)  # its own process group, to stop it whole
        self.processes[key] = process
        return process

    def start(self) -> "LocalFederation":
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True)
        self.say(f"# working folder {self.workdir}")
        self.port = free_port()
        self.placeholders.update({f"127.0.0.1:{self.port}": "127.0.0.1:<port>",
                                  f"--port {self.port}": "--port <port>"})
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        app = self.workdir / "app"
        app.mkdir()
        shutil.copy(APP_PYPROJECT, app / "pyproject.toml")

        began = time.perf_counter()
        superlink = self._spawn("superlink", [
            self.command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, superlink, timeout=60)
        self.startup_seconds = time.perf_counter() - began
        self.say(f"# the SuperLink answers on 127.0.0.1:{self.port}: took {self.startup_seconds:.1f} s")
        for k in range(self.num_supernodes):
            port = free_port()
            self.placeholders[f"--port {port}"] = f"--port <port {k}>"
            self._spawn(f"supernode-{k}", [
                self.command("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(port), "--node-config", f"partition-id={k} num-partitions={self.num_clients}"])
        return self

    def stop(self, *keys: str) -> None:
        """Stop started processes and everything they started (their process groups).

        SIGTERM to every group at once (a SuperNode then signs off at the SuperLink),
        SIGKILL to whatever is left after ``grace`` seconds.
        """
        processes = [self.processes[key] for key in keys]
        for process in processes:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Also children that outlived their parent: they still carry the group id.
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        """Stop every process group, then the processes Flower started in sessions of their own (the
        SuperExec's ``flwr-serverapp``, found by the FLWR_HOME they inherited), then remove the
        working folder."""
        self.stop(*self.processes)
        deadline = time.monotonic() + self.grace
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.stragglers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while self.stragglers() and time.monotonic() < deadline:
                time.sleep(0.1)
            deadline = time.monotonic() + 2
        shutil.rmtree(self.workdir, ignore_errors=True)

    def stragglers(self) -> list[int]:
        """Live processes (not zombies) whose FLWR_HOME is this federation's (Linux: read from /proc)."""
        home = ("FLWR_HOME=" + self.env["FLWR_HOME"]).encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if home in (entry / "environ").read_bytes().split(b"\0") and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, key: str, lines: int = 30) -> str:
        path = self.workdir / f"{key}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def run(self, run_config: dict[str, object], *, stop_in_round: int | None = None,
            timeout: float = 600) -> DeployResult:
        """``flwr run`` the app with ``run_config`` overrides and wait for its end.

        stop_in_round: stop SuperNode 0 as soon as the log shows that round R began.
        """
        history_path = self.workdir / "history.json"
        overrides = {**run_config, "min-nodes": self.num_supernodes, "num-clients": self.num_clients,
                     "history-path": str(history_path)}
        config_file = self.workdir / "run-config.toml"
        config_file.write_text(toml_run_config(overrides))
        args = [self.command("flwr"), "run", str(self.workdir / "app"), CONNECTION, "--stream",
                "--run-config", str(config_file)]
        self.say(f"# {config_file.name}: " + " ".join(config_file.read_text().splitlines()))
        self.say("$ flwr " + " ".join(a if " " not in a else f"'{a}'" for a in args[1:]))
        began = time.perf_counter()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**self.env, "NO_COLOR": "1", "TERM": "dumb"}, start_new_session=True)
        self.processes["flwr-run"] = process
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        log: list[str] = []
        stopped: list[int] = []
        deadline = time.monotonic() + timeout
        while (line := _next_line(lines, deadline)) is not None:  # None: `flwr run` closed its output
            line = _strip_ansi(line.rstrip())
            log.append(line)
            self.say(line, flower=True)
            if stop_in_round is not None and not stopped and line.startswith(f"round {stop_in_round}: S_t"):
                self.stop("supernode-0")
                stopped.append(0)
                self.say(f"# stopped SuperNode 0 (partition 0) while round {stop_in_round} runs")
        process.wait()
        if not history_path.exists():
            raise DeployFailed(f"the run ended without writing its history: {self.cause(log)}")
        return DeployResult(History.load(history_path), log, self.startup_seconds,
                            time.perf_counter() - began, stopped)

    def cause(self, log: list[str] = ()) -> str:
        """The last error line of ``log`` (the run's streamed log) or, if none, of any process's log
        (with ports and paths as placeholders), or why not."""
        found = ""
        for lines in [line for key in self.processes for line in self.log_tail(key, 200).splitlines()], log:
            for line in lines:
                if re.search(r"(Error|Exception|error:)", line) and not line.lstrip().startswith("File "):
                    found = line.strip()
        for value, name in self.placeholders.items():
            found = found.replace(value, name)
        return found[-300:] or "no process logged an error"


class DeployFailed(RuntimeError):
    """The federation ran but the run failed or timed out: one line saying why."""


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass


def _pump(stream, lines: "queue.Queue[str | None]") -> None:
    """Copy a process's output into a queue, line by line; None marks its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _next_line(lines: "queue.Queue[str | None]", deadline: float) -> str | None:
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise DeployFailed("the run did not finish within --timeout; every process was stopped") from None


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    from fedlib.cli import OneLineParser, flag_type
    from fedlib.data import DATASETS
    from fedlib.models import MODELS
    from fedlib.partition import PARTITIONS

    parser = OneLineParser(prog="python -m fedlib.flower.deploy", description=__doc__.split("\n")[0],
                           epilog="Every process runs with --insecure on 127.0.0.1 (a teaching setup): "
                                  "see this module's docstring for the TLS and authentication flags of a real "
                                  "federation.")
    parser.add_argument("--supernodes", type=flag_type(P.Range(int, 1, 64)), default=3,
                        help="SuperNodes (clients) to start, 1 to 64")
    parser.add_argument("--num-clients", type=flag_type(P.NUM_CLIENTS), default=None,
                        help="K of the partition; SuperNode k holds partition k (default: --supernodes)")
    parser.add_argument("--rounds", type=flag_type(P.ROUNDS), default=2)
    parser.add_argument("--frac", type=flag_type(P.FRAC), default=1.0,
                        help="C: the fraction of the K clients in each round (a client without a SuperNode "
                             "sends no update)")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--partition", choices=PARTITIONS, default="iid")
    parser.add_argument("--model", choices=tuple(MODELS), default="2nn")
    parser.add_argument("--local-epochs", type=flag_type(P.LOCAL_EPOCHS), default=1)
    parser.add_argument("--batch-size", type=flag_type(P.BATCH_SIZE), default=10, help='B, or "inf"')
    parser.add_argument("--lr", type=flag_type(P.LR), default=0.1)
    parser.add_argument("--seed", type=flag_type(P.SEED), default=0)
    parser.add_argument("--stop-in-round", type=flag_type(P.ROUNDS), default=None,
                        help="stop SuperNode 0 as soon as this round has begun")
    parser.add_argument("--timeout", type=flag_type(TIMEOUT), default=600,
                        help="seconds the run may take")
    parser.add_argument("--log", choices=LOG_LEVELS, default="all",
                        help="all: every log line; summary: what happened, without ports and paths")
    parser.add_argument("--out", default=None, help="write the run's History here (JSON)")
    return parser


def preflight(config: FedAvgConfig) -> None:
    """What the ServerApp and the SuperNodes will do first, done here before any process starts,
    so that a run that cannot work is refused with one line instead of failing inside Flower: the
    dataset is read (never downloaded: DatasetNotFoundError says where to put it), the model must
    fit it, and the split must give every client examples (fedlib.runner.Job does all three)."""
    from fedlib.data import load_dataset
    from fedlib.runner import Job

    Job(config, load_dataset(config.dataset, device="cpu", download=False, scaling=config.input_scaling))


def main(argv: list[str] | None = None) -> int:
    from fedlib.cli import UsageError
    from fedlib.data import DatasetNotFoundError
    from fedlib.files import WriteError, check_output

    try:
        args = build_parser().parse_args(argv)
        num_clients = args.supernodes if args.num_clients is None else args.num_clients
        if num_clients < args.supernodes:
            raise InputError(f"--num-clients (K = {num_clients}) must be >= --supernodes ({args.supernodes}): "
                             "SuperNode k holds partition k")
        if args.stop_in_round is not None and args.stop_in_round > args.rounds:
            raise InputError(f"--stop-in-round must be in [1, {args.rounds}] (--rounds), got {args.stop_in_round}")
        if args.out is not None:
            check_output(args.out, what="--out")
        config = FedAvgConfig(rounds=args.rounds, frac=args.frac, dataset=args.dataset, partition=args.partition,
                              model=args.model, local_epochs=args.local_epochs, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed, num_clients=num_clients, device="cpu").validate()
        preflight(config)
    except (UsageError, InputError) as error:
        print(error if isinstance(error, UsageError) else f"python -m fedlib.flower.deploy: {error}",
              file=sys.stderr)
        return 2
    except DatasetNotFoundError as error:
        print(error, file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # clean up on SIGTERM like on Ctrl-C
    run_config = to_record(config)
    began = time.perf_counter()
    try:
        with LocalFederation(args.supernodes, num_clients, log=args.log) as federation:
            result = federation.run(run_config, stop_in_round=args.stop_in_round, timeout=args.timeout)
            trained = any(r.clients for r in result.history.records)
            cause = "" if trained else federation.cause(result.log)
    except KeyboardInterrupt:
        print("# interrupted: every process was stopped", file=sys.stderr)
        return 130
    except DeployFailed as error:
        print(f"python -m fedlib.flower.deploy: {error}", file=sys.stderr)
        return 1
    if not trained and not args.stop_in_round:                # the run trained nothing: say why, exit 1
        if cause == "no process logged an error" and num_clients > args.supernodes:
            have = f"clients 0 to {args.supernodes - 1}" if args.supernodes > 1 else "client 0"
            cause = f"only {have} of the K = {num_clients} have a SuperNode"
        print(f"python -m fedlib.flower.deploy: no client sent an update in any of the {args.rounds} rounds "
              f"({cause})", file=sys.stderr)
        return 1
    history = result.history
    print(f"# all processes stopped; the whole deployment took {time.perf_counter() - began:.1f} s", flush=True)
    for record in history.records:
        print(f"# round {record.round}: clients {record.clients}, test accuracy {record.test_accuracy:.4f}, "
              f"took {record.seconds:.1f} s", flush=True)
    if args.out is not None:
        try:
            history.save(args.out)
        except WriteError as error:
            print(f"python -m fedlib.flower.deploy: {error}; the run's rounds are printed above, its history "
                  "is lost: free some space and run the same command again", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
