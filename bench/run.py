"""``make bench``: the HTTP benchmark, then the classifier's cost when that bench exists.

Each part prints its own figures and ratios against the baseline measured in
the same run. ``bench/bpf_cost.py`` is written by another part of the project;
this entry point only runs it (``main()``, else ``measure()``) if the module is there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    import http_bench

    print("== HTTP: backend vs nginx vs sidecar ==", flush=True)
    status = http_bench.main(argv)
    if importlib.util.find_spec("bpf_cost") is not None:
        import bpf_cost

        print("\n== tc classifier cost ==", flush=True)
        if hasattr(bpf_cost, "main"):  # its own table, root check and limit
            status = bpf_cost.main([]) or status
        else:
            print(bpf_cost.measure())
    else:
        print("\n(bench/bpf_cost.py not present: classifier cost not measured)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
