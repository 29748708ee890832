"""Freed heap memory goes back to the kernel when the sidecar asks (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# In a child, so the figures are that process's alone: allocate 64 MiB in chunks
# glibc serves from its heap (below the mmap threshold), free every other one so
# the heap cannot simply shrink from the top, then compare RSS around the call.
CHILD = textwrap.dedent("""\
    import json
    from sidecar.memtrim import give_back_free_memory

    def rss_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    chunks = [bytearray(64 * 1024) for _ in range(1024)]
    del chunks[::2]
    before = rss_kb()
    done = give_back_free_memory()
    print(json.dumps({"done": done, "before": before, "after": rss_kb()}))
    """)


def test_free_heap_pages_are_returned_on_request() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    res = json.loads(out.stdout)
    assert res["done"] is True, "this machine's C library is glibc: malloc_trim must be found"
    # 512 freed chunks of 64 KiB are 32 MiB; most of it must leave the resident set.
    assert res["before"] - res["after"] > 24 * 1024, res
