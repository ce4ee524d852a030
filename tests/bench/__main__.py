"""`make bench`: run every benchmark module of tests/bench, each printing `BENCH ...` lines."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for module in sorted(m.name for m in pkgutil.iter_modules([str(here)])
                         if m.name.startswith("bench_")):
        try:
            importlib.import_module(f"tests.bench.{module}").main()
        except Exception as error:  # one broken benchmark must not hide the others
            print(f"BENCH {module} error={type(error).__name__}:{error}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
