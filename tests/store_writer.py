"""Child process for the store's crash and multi-process tests.

    store_writer.py acked ROOT N     put N small adapters, printing
                                     "ok <id> <version> <sha256>" after each,
                                     then "big", then upload 200 MB slowly to
                                     id "big" (the test kills us meanwhile)
    store_writer.py hammer ROOT ID N put N small versions to ID, printing
                                     "ok <version>" after each
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petserve.serving.store import LocalDirStore  # noqa: E402


class SlowZeros:
    """A file-like object of `size` zero bytes that takes its time."""

    def __init__(self, size: int, delay_s: float) -> None:
        self.left = size
        self.delay_s = delay_s

    def read(self, n: int = -1) -> bytes:
        time.sleep(self.delay_s)
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def acked(root: str, n: int) -> None:
    store = LocalDirStore(root, max_bytes=400 * 2**20)
    ids = ["big"] + [f"small-{i}" for i in range(1, n)]
    for adapter_id in ids:
        st = store.put(adapter_id, os.urandom(1000 + len(adapter_id)), {"kind": "lora"})
        print("ok", st.id, st.version, st.sha256, flush=True)
    print("big", flush=True)
    store.put("big", SlowZeros(200 * 2**20, 0.01), {"kind": "lora"})
    print("finished", flush=True)  # the test fails if we ever get here


def hammer(root: str, adapter_id: str, n: int) -> None:
    store = LocalDirStore(root, keep_versions=None)
    for i in range(n):
        st = store.put(adapter_id, os.urandom(100), {"i": i})
        print("ok", st.version, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "acked":
        acked(sys.argv[2], int(sys.argv[3]))
    else:
        hammer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
