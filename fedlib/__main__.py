"""``python -m fedlib``: see :mod:`fedlib.cli`."""

from fedlib.cli import main

raise SystemExit(main())
