"""``python -m fedlib`` and the ``fedlib`` command: see :mod:`fedlib.cli`.

Importing the command line imports torch, which takes a second or more; a Ctrl-C meanwhile
ends the program with one line and exit status 130, like a Ctrl-C anywhere later (the package
``fedlib`` itself imports nothing heavy until a name of it is used).
"""

import signal
import sys


def launch() -> int:
    """Import and run :func:`fedlib.cli.main`; the exit status."""
    try:
        from fedlib.cli import main
    except KeyboardInterrupt:
        print("fedlib: interrupted", file=sys.stderr)
        return 130
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # nothing may interrupt the exit itself
    return code


if __name__ == "__main__":
    raise SystemExit(launch())
