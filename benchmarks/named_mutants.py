"""The six changes issue 21 named, each applied to a copy of the package, and the tests that fail on it.

mutmut (``make mutation``) does not generate these exact changes (it does not swap the operands of
``c - c_k``, say), so this script makes each one by hand in a temporary copy of the repository and runs
the algorithm tests there. Each change must make at least one test fail; the script prints which, and
exits 1 if a change survives or if the unchanged copy does not pass. Report: benchmarks/mutation.md.

    .venv/bin/python benchmarks/named_mutants.py          # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_algorithms.py", "tests/test_fedavg.py"]

# name -> [(file, the code as it is, the changed code)]; each "as it is" must occur exactly once.
NAMED = {
    "SCAFFOLD's correction with the wrong sign (c_k - c)": [
        ("fedlib/strategies.py", "correction={name: self.c[name] - c_k[name] for name in self.c}",
         "correction={name: c_k[name] - self.c[name] for name in self.c}")],
    "c_k+ computed with +c": [
        ("fedlib/strategies.py", "new = {name: c_k[name] - self.c[name] + (w_t[name]",
         "new = {name: c_k[name] + self.c[name] + (w_t[name]")],
    "c_k+ without the c_k term": [
        ("fedlib/strategies.py", "new = {name: c_k[name] - self.c[name] + (w_t[name]",
         "new = {name: - self.c[name] + (w_t[name]")],
    "FedAvgM switched off (FedAvg's server step always)": [
        ("fedlib/strategies.py", "        return {name: w_t[name] + self.eta_g * self.m[name] for name in w_t}",
         "        return FedAvg.aggregate(self, w_t, updates, t)")],
    "mu replaced by 0 in both engines": [
        ("fedlib/client.py", '    P.MU.check("mu", mu)\n', '    P.MU.check("mu", mu)\n    mu = 0.0\n'),
        ("fedlib/engine/local.py", '    P.MU.check("mu", mu)\n', '    P.MU.check("mu", mu)\n    mu = 0.0\n')],
    "dp_aggregate bypassed (FedAvg's average)": [
        ("fedlib/strategies.py", "        return privacy.dp_aggregate(w_t, [u.weights",
         "        return FedAvg.aggregate(self, w_t, updates, t)\n        return privacy.dp_aggregate(w_t, [u.weights")],
}


def run_tests(copy: Path) -> tuple[int, list[str], float]:
    """Run the algorithm tests in ``copy`` (its fedlib, not the installed one); (status, failed tests, s)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-rf", *TESTS],
                          cwd=copy, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE)))
    return done.returncode, failed, time.perf_counter() - began


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="named-mutants-") as tmp:
        copy = Path(tmp)
        for part in ("fedlib", "tests", "booktools", "pyproject.toml"):
            source = ROOT / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy / part)
        where = subprocess.run([sys.executable, "-c", "import fedlib; print(fedlib.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        assert where.stdout.startswith(str(copy)), f"the copy's fedlib is not the one imported: {where.stdout}"
        status, failed, seconds = run_tests(copy)
        print(f"## unchanged: status {status}, {len(failed)} failed ({seconds:.0f} s)")
        if status != 0:
            print("\n".join(failed))
            return 1
        survivors = []
        for name, changes in NAMED.items():
            originals = {}
            for file, before, after in changes:
                path = copy / file
                text = originals.setdefault(path, path.read_text())
                current = path.read_text()
                assert text.count(before) == 1, f"{name}: {before!r} is not in {file} exactly once"
                path.write_text(current.replace(before, after))
            status, failed, seconds = run_tests(copy)
            for path, text in originals.items():
                path.write_text(text)
            print(f"## {name}: status {status}, {len(failed)} failed ({seconds:.0f} s)")
            for test in failed:
                print(f"    {test}")
            if not failed:
                survivors.append(name)
        print(f"# {len(NAMED) - len(survivors)} of {len(NAMED)} changes killed" +
              (f"; SURVIVED: {survivors}" if survivors else ""))
        return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
