"""``python -m fedlib`` and the ``fedlib`` command: see :mod:`fedlib.cli`.

Importing the command line imports torch, which takes a second or more; a Ctrl-C meanwhile
ends the program with one line and exit status 130, like a Ctrl-C anywhere later (the package
``fedlib`` itself imports nothing heavy until a name of it is used). Only the first Ctrl-C (or
SIGTERM) interrupts: the ones after it are ignored, so that the checkpoint being saved and the
line saying so are never cut short, and no traceback is printed.
"""

import os
import signal
import sys


interrupted = False      # set by the first signal, even if the KeyboardInterrupt is then lost


def first_interrupt_only(signum, frame) -> None:
    """SIGINT and SIGTERM: raise KeyboardInterrupt once, and ignore both from then on."""
    global interrupted
    interrupted = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def stop_interrupted() -> None:
    """End the program after a Ctrl-C during the imports: one line, status 130."""
    print("fedlib: interrupted", file=sys.stderr)
    # Nothing is written yet, so end here: a Ctrl-C that landed while an extension ran code
    # through PyRun_* marks CPython's "unhandled KeyboardInterrupt" flag even though it was
    # handled, and a normal exit would then kill the process with SIGINT (status -2, not 130).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def launch() -> int:
    """Import and run :func:`fedlib.cli.main`; the exit status."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, first_interrupt_only)
    try:
        from fedlib.cli import main
    except KeyboardInterrupt:
        stop_interrupted()
    except Exception:
        # After a Ctrl-C, the code it landed in may have turned its KeyboardInterrupt into another
        # error (Python 3.11 wraps one raised while a class is created in a RuntimeError, as in
        # torch's import); without a Ctrl-C, the error is a bug and shows its traceback.
        if not interrupted:
            raise
        stop_interrupted()
    if interrupted:          # the signal came, but code imported meanwhile swallowed its KeyboardInterrupt
        stop_interrupted()
    return main(terminate=first_interrupt_only)


if __name__ == "__main__":
    raise SystemExit(launch())
