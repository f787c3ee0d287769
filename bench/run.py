"""`python -m bench.run`: every benchmark module in bench/, each writing its JSON result.

A benchmark module is any bench/*.py with a run() -> dict; its result goes where the
module's RESULTS names, or to bench/results/<module>.json. One that fails is reported
and the others still run; the exit status says whether all succeeded.

Each module runs in a Python process of its own (`python -m bench.run NAME`): one
benchmark's leftovers (a heap of 100,000 clients' objects, filled caches, loaded
programs) would otherwise weigh on the next one's figures, as they would on no
real agent's.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import traceback
from pathlib import Path

import bench

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOT_BENCHMARKS = {"run"}


def benchmark_modules() -> list[str]:
    return sorted(
        name
        for _, name, is_package in pkgutil.iter_modules(bench.__path__)
        if not is_package and name not in NOT_BENCHMARKS
    )


def run_one(name: str) -> Path:
    """Runs one module's benchmark, writes its JSON, prints its table if it has one."""
    module = importlib.import_module(f"bench.{name}")
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"bench/{name}.py has no run()")
    result = module.run()
    path = Path(getattr(module, "RESULTS", RESULTS_DIR / f"{name}.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    summary = getattr(module, "table", None)
    print(summary(result) if callable(summary) else json.dumps(result, indent=2))
    return path


def main(argv: list[str]) -> int:
    if argv:  # one module, in this process
        (name,) = argv
        try:
            path = run_one(name)
        except Exception:
            traceback.print_exc()
            return 1
        print(f"wrote {path}", flush=True)
        return 0
    failed = []
    for name in benchmark_modules():
        print(f"== bench/{name}.py", flush=True)
        # One broken benchmark must not hide the others' results.
        if subprocess.run([sys.executable, "-m", "bench.run", name], check=False).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
