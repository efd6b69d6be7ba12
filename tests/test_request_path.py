"""The files of ours one VQA request runs through, HTTP route to kernel call, traced (every thread:
the event loop, the worker that submits, the scheduler). docs/ARCHITECTURE.md lists them; a change
that lengthens the path must update both."""
from __future__ import annotations

import base64
import io
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from petserve.adapters.data import make_demo_examples
from petserve.serving.api import create_app
from tests.test_api import AUTH, make_adapter, make_backend

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(f"{ROOT}/{d}/" for d in ("adapters", "kernels", "serving"))

# docs/ARCHITECTURE.md, "The life of one request"
WARM = {
    "serving/api.py", "serving/metrics.py", "serving/schemas.py", "serving/media.py",
    "serving/store.py", "serving/deployments.py", "serving/engine.py", "serving/scheduler.py",
    "serving/slot_pool.py", "adapters/backbone/feature_cache.py", "adapters/generation.py",
    "adapters/backbone/model.py", "adapters/backbone/lm.py", "adapters/backbone/layers.py",
    "adapters/backbone/cache.py", "adapters/backbone/config.py", "adapters/backbone/visual.py",
    "adapters/backbone/tokenizer.py", "adapters/tasks.py", "adapters/runtime/context.py",
    "adapters/runtime/meta.py", "adapters/runtime/bank.py", "adapters/runtime/weights.py",
    "kernels/dispatch.py", "kernels/segments.py", "kernels/lowrank.py", "kernels/grouped_linear.py",
}
COLD_EXTRA = {   # the adapter read from the store, parsed, compiled into a slot; the image encoded
    "adapters/adapter_file.py", "adapters/kinds/__init__.py", "adapters/kinds/base.py",
    "adapters/kinds/lora.py", "adapters/runtime/forms.py", "adapters/backbone/clip.py",
}


class FileTrace:
    """Every file of ours whose code is called while it is on, in any thread started meanwhile."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.on = False

    def __call__(self, frame, event, arg):
        if self.on and event == "call" and frame.f_code.co_filename.startswith(OURS):
            self.files.add(str(Path(frame.f_code.co_filename).relative_to(ROOT)))
        return None


@pytest.fixture(scope="module")
def traced(tiny_t5, tmp_path_factory):
    trace = FileTrace()
    threading.settrace(trace)          # threads started from here on: loop, workers, scheduler
    try:
        backend, config = make_backend(tiny_t5, tmp_path_factory.mktemp("store"), num_slots=4)
        backend.start()
        with TestClient(create_app(backend, config)) as client:
            assert client.put("/v1/adapters/a", content=make_adapter(tiny_t5, "lora", 0),
                              headers=AUTH).status_code == 201
            yield client, trace
        backend.stop()
    finally:
        threading.settrace(None)


def _vqa(client, trace: FileTrace, seed: int) -> set[str]:
    image = make_demo_examples("colors", 1, seed)[0].load_images()[0]
    buf = io.BytesIO()
    image.save(buf, "PNG")
    body = {"adapter": "a", "image": base64.b64encode(buf.getvalue()).decode(),
            "question": "what color is the shape?", "max_new_tokens": 4}
    trace.files.clear()
    trace.on = True
    sys.settrace(trace)
    try:
        r = client.post("/v1/vqa", json=body)
    finally:
        sys.settrace(None)
        trace.on = False
    assert r.status_code == 200, r.text
    return set(trace.files)


def test_cold_then_warm_request_paths(traced):
    client, trace = traced
    cold = _vqa(client, trace, seed=11)          # adapter loaded into a slot, image encoded
    warm = _vqa(client, trace, seed=11)          # adapter resident, features cached
    assert warm <= WARM, sorted(warm - WARM)
    assert cold <= WARM | COLD_EXTRA, sorted(cold - WARM - COLD_EXTRA)
    assert {"serving/api.py", "serving/engine.py", "kernels/lowrank.py"} <= warm
    assert "adapters/adapter_file.py" in cold and "adapters/adapter_file.py" not in warm
    print(f"request path: warm {len(warm)} files, cold {len(cold)} files")
