"""Run every bench/bench_*.py with --write, one after the other (what `make bench` does).

    python bench/run_all.py                 # all benchmarks, each rewrites its BENCHMARKS.md section
    python bench/run_all.py --only sft dpo  # just bench_sft.py and bench_dpo.py
    python bench/run_all.py --list          # show what would run

A failing benchmark is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="benchmark names (bench_<name>.py) to run")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--no-write", action="store_true", help="print the tables without touching BENCHMARKS.md")
    args = p.parse_args()

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in args.only}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have: "
                  f"{', '.join(s.stem.removeprefix('bench_') for s in scripts)}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    if args.list:
        print("\n".join(str(s.relative_to(HERE.parent)) for s in scripts))
        return 0

    failed = []
    for s in scripts:
        cmd = [sys.executable, str(s)] + ([] if args.no_write else ["--write"])
        print(f"==> {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"<== {s.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f}s\n",
              flush=True)
        if rc != 0:
            failed.append(s.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
