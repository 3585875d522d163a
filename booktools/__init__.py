"""The book's own tooling, shipped beside fedlib but not part of it: the lessons' hidden checks.

:func:`check_stored` is the oracle of the lessons' tests (nbval runs it in each lesson's hidden
cells): it compares a number a lesson computed with the value stored in the lesson, within the
spread of that number over seeds. Students import ``fedlib``; the lessons import this only in
their hidden check cells, which is why it is installed with the package (a lesson opened in
Colab runs its checks too) but lives outside it.
"""

from __future__ import annotations

import json
import os

__all__ = ["check_stored"]


def check_stored(what: str, value: float, stored: float, within: float) -> None:
    """Assert that a trained number is close to the value stored in the lesson.

    The stored outputs come from the quick profile on a CPU. On another machine (other
    kernels, a GPU) float rounding perturbs the run; in a long, chaotic training run the
    perturbation can grow until the result is simply another draw of the same random
    process, as if the seed had changed but the partition, sampling and shuffles had not.
    So ``within`` is the spread of the number over seeds 0-4 (measured, and written in a
    comment at the call), and two draws of that process may differ by up to about twice
    their spread: the check allows ``2 * within``. Only the quick profile has stored
    values: in the full profile this checks nothing.
    """
    from fedlib import lessons

    if lessons.profile() != "quick":
        return
    log = os.environ.get("FEDLIB_CHECKS_LOG")            # notebooks/execute.py: stored values gone stale?
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"what": what, "value": float(value), "stored": stored, "within": within}) + "\n")
    if not abs(value - stored) <= 2 * within:
        raise AssertionError(f"{what} = {value:.6g}, but the lesson stores {stored:g} "
                             f"(allowed difference 2 x {within:g})")
