"""``make bench``: every benchmark of the project, each against its baseline in the same run.

1. HTTP (``http_bench.py``): wrk against the backend, nginx and both sidecar sides;
   req/s, latency, CPU per request, ratios to nginx, RSS next to an nginx worker's.
2. HTTP/2 (``h2_bench.py``): h2load against nghttpd, nginx as an h2c proxy and both
   sidecar sides; req/s, p99, CPU per request and ratios to nginx, RSS per idle h2
   connection.
3. Classifier (``bpf_cost.py``): ns per packet at 1, 10k and 1M flows next to an
   empty tc program (root).
4. Capture (``capture_bench.py``): the sidecar in capture mode next to HTTP_PROXY
   mode and nginx, keep-alive and ``Connection: close``, in namespaces (root).
5. Footprint (``footprint.py``): start-up to ready with and without the data path,
   RSS with 10k open flows (root).

Arguments go to the HTTP part (``make bench BENCH_ARGS="--seconds 5"``). Each
part prints its own bar; the exit status is 1 when any bar is missed, 2 when a
part could not run (the root-only parts without root).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpf_cost
import capture_bench
import footprint
import h2_bench
import http_bench

PARTS = (
    ("HTTP: backend vs nginx vs sidecar", http_bench.main),
    ("HTTP/2: nghttpd vs nginx (h2c) vs sidecar", h2_bench.main),
    ("tc classifier cost per packet", bpf_cost.main),
    ("capture vs HTTP_PROXY mode vs nginx", capture_bench.main),
    ("footprint: start-up and RSS", footprint.main),
)


def main(argv: list[str]) -> int:
    worst = 0
    for i, (title, run) in enumerate(PARTS):
        print(f"{'' if i == 0 else chr(10)}== {title} ==", flush=True)
        status = run(argv if run in (http_bench.main, capture_bench.main) else [])
        sys.stdout.flush()
        worst = max(worst, status or 0)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
