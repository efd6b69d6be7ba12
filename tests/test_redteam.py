"""Red-team cases in-process (serving.api's app on a LocalBackend, tiny T5): every hostile request
gets a clear 4xx JSON error `{"error": {"code", "message"}}`, the server stays healthy (`/healthz`
200 and a request on the adapter uploaded first still answers from its version 1) and nothing
stored is lost. Cases that need a real process are in tests/test_redteam_server.py.

Pinned elsewhere, so not repeated: ids in the store (test_store), one bad id per route and 'A/B' in
the body (test_api), every broken adapter file one by one (test_adapter_file: truncated, pickle,
offsets, shape, I64), zip bombs and oversize files (test_uploads), image bombs, corrupt and
truncated images, bad base64, a text file as a JSON image, truncated videos (test_media, test_api),
a 5000-character question, beams 0 / 99, oversize inference bodies by Content-Length and chunked,
503 on a full queue (test_api), SIGKILL during a slow upload (test_cli_serve).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from petserve.adapters.adapter_file import load_adapter
from petserve.serving.api import create_app
from petserve.serving.store import ADAPTER_ID_RE
from tests.test_adapter_file import _join, _split
from tests.test_api import AUTH, ask, b64, features, make_adapter, make_backend
from tests.test_media import _png
from tests.test_serve_e2e import run_alone

KEEPER = "keeper"
Q = {"question": "what is it?"}


@pytest.fixture(scope="module")
def served(tiny_t5, tmp_path_factory):
    backend, config = make_backend(tiny_t5, tmp_path_factory.mktemp("store"), num_slots=4)
    backend.start()
    # raise_server_exceptions=False: a server bug must show as the 500 a client would get
    with TestClient(create_app(backend, config), raise_server_exceptions=False) as client:
        r = client.put(f"/v1/adapters/{KEEPER}", content=make_adapter(tiny_t5, "lora", 0),
                       headers=AUTH)
        assert r.status_code == 201, r.text
        yield client, backend, r.json()["sha256"]
    backend.stop()


@pytest.fixture
def client(served):
    """The client; after each test the server must still be healthy and the keeper intact."""
    client, backend, keeper_sha = served
    yield client
    assert client.get("/healthz").status_code == 200
    kept = client.get(f"/v1/adapters/{KEEPER}").json()
    assert (kept["version"], kept["sha256"]) == (1, keeper_sha)
    answer = ask(client, KEEPER, features(0), max_new=2)
    assert answer.status_code == 200 and answer.json()["adapter_version"] == 1, answer.text
    assert not list(backend.store.root.rglob(".tmp-*"))


def refused(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"code", "message"} and error["message"], error
    assert code is None or error["code"] == code, error
    return error


# ---- adapter ids ------------------------------------------------------------------------------

# The path as sent (httpx would resolve a literal '..' itself; test_redteam_server sends one raw),
# and the id it decodes to.
BAD_IDS = {
    "dot-dot": ("%2E%2E", ".."),
    "traversal": ("%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "../../etc/passwd"),
    "slash": ("a/b", "a/b"),
    "encoded slash": ("a%2Fb", "a/b"),
    "5000 chars": ("a" * 5000, "a" * 5000),
    "unicode": ("%C3%A9t%C3%A9", "été"),
    "empty": ("", ""),
    "nul": ("a%00b", "a\x00b"),
}


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("path", [p for p, _ in BAD_IDS.values()], ids=list(BAD_IDS))
def test_bad_id_in_the_path_is_400(client, served, tiny_t5, method, path):
    body = make_adapter(tiny_t5, "lora", 1) if method == "PUT" else None
    r = client.request(method, f"/v1/adapters/{path}", content=body, headers=AUTH)
    refused(r, 400, "invalid_adapter_id")
    store = served[1].store.root
    assert all(re.fullmatch(ADAPTER_ID_RE, p.name) for p in store.iterdir()
               if not p.name.startswith("."))
    assert not any(store.parent.glob("etc*"))


BODY_IDS = {**{name: decoded for name, (_, decoded) in BAD_IDS.items()}, "encoded slash": "a%2Fb"}


@pytest.mark.parametrize("adapter", list(BODY_IDS.values()), ids=list(BODY_IDS))
def test_bad_id_in_the_body_is_422(client, adapter):
    error = refused(client.post("/v1/vqa", json={**Q, "features": features(1), "adapter": adapter}),
                    422, "invalid_request")
    assert error["message"].startswith("adapter:")


# ---- adapter uploads --------------------------------------------------------------------------


def _bad_uploads(model) -> dict[str, tuple[bytes, str]]:
    good = make_adapter(model, "lora", 2)
    header, body = _split(good)
    first = sorted(k for k in header if k != "__metadata__")[0]
    huge = json.loads(json.dumps(header))
    huge[first].update(shape=[2**31, 2**31], data_offsets=[0, 2**64])
    meta = header["__metadata__"]
    params = load_adapter(good, model).params
    vlpet_header, vlpet_body = _split(make_adapter(model, "vlpet", 3))
    vlpet_header["__metadata__"] = meta              # a vlpet's tensors under a lora's metadata
    pickled = io.BytesIO()
    torch.save(params, pickled)                      # a zip holding a pickle
    return {
        "random bytes": (random.Random(0).randbytes(4096), "not_safetensors"),
        "torch.save pickle": (pickled.getvalue(), "not_peft_dir"),
        "header claims 2**63 bytes": (struct.pack("<Q", 2**63) + good[8:], "not_safetensors"),
        "header claims 60 MB": (struct.pack("<Q", 60 * 2**20) + good[8:], "not_safetensors"),
        "tensor claims 2**62 values": (_join(huge, body), "truncated"),
        "float64 tensors": (save({k: v.double() for k, v in params.items()}, metadata=meta),
                            "bad_dtype"),
        "int32 tensors": (save({k: v.int() for k, v in params.items()}, metadata=meta),
                          "bad_dtype"),
        "another kind's tensors": (_join(vlpet_header, vlpet_body), "missing_tensors"),
    }


@pytest.fixture(scope="module")
def bad_uploads(tiny_t5):
    return _bad_uploads(tiny_t5)


@pytest.mark.parametrize("name", ["random bytes", "torch.save pickle", "header claims 2**63 bytes",
                                  "header claims 60 MB", "tensor claims 2**62 values",
                                  "float64 tensors", "int32 tensors", "another kind's tensors"])
def test_broken_upload_over_the_keeper_is_422_and_keeps_it(client, bad_uploads, name):
    data, code = bad_uploads[name]
    refused(client.put(f"/v1/adapters/{KEEPER}", content=data, headers=AUTH), 422, code)


@pytest.mark.parametrize("label", ["application/x-www-form-urlencoded", "multipart/form-data",
                                   "text/plain", None])
def test_upload_is_recognised_by_content_whatever_its_label(client, tiny_t5, bad_uploads, label):
    """curl --data-binary labels a file a urlencoded form; a raw adapter file stays the file."""
    headers = {**AUTH, **({"content-type": label} if label else {})}
    good = make_adapter(tiny_t5, "lora", 4)
    r = client.put("/v1/adapters/labelled", content=good, headers=headers)
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(good).hexdigest(), r.text
    zipped, code = bad_uploads["torch.save pickle"]          # read as a zip, not as a form
    refused(client.put("/v1/adapters/labelled", content=zipped, headers=headers), 422, code)


def test_upload_over_the_cap_is_413_from_content_length(client):
    headers = {**AUTH, "content-length": str(10**12)}
    refused(client.put(f"/v1/adapters/{KEEPER}", content=b"", headers=headers), 413,
            "payload_too_large")


def test_streamed_upload_over_the_cap_is_cut_off_unread(served, client):
    """No Content-Length: the server must stop reading once the body passes the cap (4 MB), not
    buffer the 64 MB."""
    pulled = []

    async def chunks():
        for i in range(64):
            pulled.append(i)
            yield bytes(2**20)

    async def put():
        transport = httpx.ASGITransport(app=client.app)   # pulls the body lazily, as a socket
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            return await ac.put(f"/v1/adapters/{KEEPER}", content=chunks(), headers=AUTH)

    refused(asyncio.run(put()), 413, "payload_too_large")
    assert len(pulled) <= 6


# ---- media ------------------------------------------------------------------------------------


def encode_video(width: int, height: int, frames: int, codec="libx264", fmt="mp4",
                 pix_fmt="yuv420p") -> bytes:
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(frames):
            pixels = np.full((height, width, 3), 30 * i % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def video_declaring_frames(count: int) -> bytes:
    """An 8-frame raw-video .mov whose sample tables claim `count` frames."""
    data = bytearray(encode_video(16, 16, 8, codec="rawvideo", fmt="mov", pix_fmt="rgb24"))
    stsz, stts, stsc = (data.find(box) for box in (b"stsz", b"stts", b"stsc"))
    data[stsz + 12:stsz + 16] = struct.pack(">I", count)          # sample count (uniform size)
    data[stts + 12:stts + 16] = struct.pack(">I", count)          # samples of the one duration
    data[stsc + 16:stsc + 20] = struct.pack(">I", count)          # samples in the one chunk
    return bytes(data)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9"/></svg>'


@pytest.fixture(scope="module")
def media_cases() -> dict[str, tuple[str, bytes, int, str]]:
    """name -> (media field, file bytes, status, code)."""
    good = encode_video(32, 32, 6)
    corrupt = bytearray(good)
    corrupt[len(good) // 3:len(good) // 3 + 256] = random.Random(1).randbytes(256)
    return {
        "png declaring 50000x50000": ("image", _png(50000, 50000, zlib.compress(b"")), 413,
                                      "image_too_large"),
        "svg": ("image", SVG, 415, "unsupported_image_format"),
        "text file": ("image", b"just some text\n" * 20, 415, "unsupported_image_format"),
        "empty video": ("video", b"", 422, "missing_media"),
        "corrupt video": ("video", bytes(corrupt), 415, "unsupported_video"),
        "video of 4096x4096 frames": ("video", encode_video(4096, 4096, 1), 413,
                                      "video_too_large"),
    }


MEDIA = ["png declaring 50000x50000", "svg", "text file", "empty video", "corrupt video",
         "video of 4096x4096 frames"]


@pytest.mark.parametrize("name", MEDIA)
def test_hostile_media_file_is_refused(client, media_cases, name):
    field, data, status, code = media_cases[name]
    refused(client.post("/v1/vqa", data=Q, files={field: ("upload", data)}), status, code)


@pytest.mark.parametrize("name", ["png declaring 50000x50000", "svg"])
def test_hostile_media_as_base64_is_refused(client, media_cases, name):
    field, data, status, code = media_cases[name]
    refused(client.post("/v1/vqa", json={**Q, field: b64(data)}), status, code)


def test_video_declaring_10e6_frames_is_read_for_the_8_it_has(client):
    """The sample tables' count is not trusted: the frames sampled are those of the file."""
    from petserve.serving.media import MediaLimits, decode_video
    lying, honest = video_declaring_frames(10**6), video_declaring_frames(8)
    np.testing.assert_array_equal(decode_video(lying, MediaLimits(), 8),
                                  decode_video(honest, MediaLimits(), 8))
    r = client.post("/v1/vqa", data={**Q, "max_new_tokens": "2"},
                    files={"video": ("clip.mov", lying)})
    assert r.status_code == 200, r.text


# Peak memory of one decode_video call, in a fresh process (in this one, memory freed by earlier
# decodes would be reused unseen).
PEAK_OF_DECODE = """
import sys
import decord  # noqa: F401 - its libraries load before the peak is reset
from petserve.serving.errors import ApiError
from petserve.serving.media import MediaLimits, decode_video
def mb(field):
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) / 1024
data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # reset VmHWM, the peak RSS, to VmRSS
before = mb("VmRSS")
try:
    decode_video(data, MediaLimits(), 8)
    print("decoded", 0)
except ApiError as e:
    print(e.code, round(mb("VmHWM") - before))
"""


def test_video_declaring_huge_frames_is_refused_before_decoding(media_cases, tmp_path):
    path = tmp_path / "huge.mp4"
    path.write_bytes(media_cases["video of 4096x4096 frames"][1])
    done = subprocess.run([sys.executable, "-c", PEAK_OF_DECODE, str(path)], capture_output=True,
                          text=True, timeout=120)
    code, peak_mb = done.stdout.split()
    assert code == "video_too_large" and int(peak_mb) < 64, (code, peak_mb)


# ---- text and JSON ----------------------------------------------------------------------------

DEEP = "[" * 10_000 + "]" * 10_000


def test_json_nested_10000_deep_is_400(client):
    body = '{"question": "q", "features": ' + DEEP + "}"
    refused(client.post("/v1/vqa", content=body, headers={"content-type": "application/json"}),
            400, "invalid_json")


@pytest.mark.parametrize("field", ["features", "boxes"])
def test_form_json_nested_10000_deep_is_422(client, field):
    refused(client.post("/v1/vqa", data={**Q, field: DEEP}), 422, "invalid_request")


def test_nul_bytes(client):
    raw = b'{"question": "what\x00is it?", "features": [[0.5]]}'
    refused(client.post("/v1/vqa", content=raw, headers={"content-type": "application/json"}),
            400, "invalid_json")
    # an escaped U+0000 is valid text: tokenized like any other character, answered
    escaped = client.post("/v1/vqa", json={**Q, "question": "what\x00is\x00it?",
                                           "features": features(2), "max_new_tokens": 2})
    assert escaped.status_code == 200, escaped.text


def test_100k_character_text_is_422(client):
    long = "x" * 100_000
    form = client.post("/v1/vqa", data={"question": long, "features": json.dumps(features(3))})
    assert refused(form, 422, "invalid_request")["message"].startswith("question:")
    caption = client.post("/v1/caption", json={"prompt": long, "features": features(3)})
    assert refused(caption, 422, "invalid_request")["message"].startswith("prompt:")


WRONG_TYPES = [
    ("adapter", 5), ("adapter", [5]), ("image", 5), ("video", {}), ("images", "x"),
    ("features", "x"), ("features", [["a"] * 64]), ("features", [[None] * 64]), ("boxes", "x"),
    ("question", 5), ("question", None), ("question", ["q"]), ("task", 3),
    ("max_new_tokens", "many"), ("max_new_tokens", 1.5), ("max_new_tokens", [2]),
    ("max_new_tokens", -1), ("max_new_tokens", 0), ("max_new_tokens", 10**6),
    ("max_new_tokens", 2**70), ("num_beams", -1), ("num_beams", 2**70), ("num_beams", {}),
    ("unknown_field", 1),
]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={str(v)[:12]}" for f, v in WRONG_TYPES])
def test_wrong_type_or_range_in_a_field_is_422_naming_it(client, field, value):
    body = {**Q, "features": features(4), field: value}
    error = refused(client.post("/v1/vqa", json=body), 422, "invalid_request")
    assert error["message"].startswith(field), error


@pytest.mark.parametrize("field,value", [("max_new_tokens", "-1"), ("num_beams", "1000000"),
                                         ("max_new_tokens", "lots")])
def test_wrong_number_in_a_form_field_is_422(client, field, value):
    form = {**Q, "features": json.dumps(features(4)), field: value}
    assert refused(client.post("/v1/vqa", data=form), 422, "invalid_request")["message"] \
        .startswith(field)


@pytest.mark.parametrize("body", ["[1]", '"text"', "null", "1e999"])
def test_json_body_that_is_not_an_object_is_refused(client, body):
    r = client.post("/v1/vqa", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in ("invalid_json",
                                                                         "invalid_request")


@pytest.mark.parametrize("field,value", [("max_new_tokens", True), ("num_beams", "2"),
                                         ("features", [["0.5"] * 64])])
def test_json_coercible_wrong_type_is_422(client, field, value):
    refused(client.post("/v1/vqa", json={**Q, "features": features(4), field: value}), 422,
            "invalid_request")


# ---- one id under fire ------------------------------------------------------------------------


async def _uploads_and_requests_around_a_delete(app, files: list[bytes], gated: int):
    """PUT files[1:] of one id at once, the last `gated` of them held mid-body until a DELETE has
    answered (sent once the others have); meanwhile requests on the id, a few at a time, until
    every upload has answered. Returns (upload answers, delete answer, request answers)."""
    release, puts_done = asyncio.Event(), asyncio.Event()

    async def held(data: bytes, gate: bool):
        yield data[:64]
        if gate:
            await release.wait()
        yield data[64:]

    async def requests(ac) -> list[httpx.Response]:
        out = []
        for i in range(40):                              # bounded: 40 rounds of 2
            last = puts_done.is_set()
            out += await asyncio.gather(*(ac.post("/v1/vqa", json={
                **Q, "adapter": "race", "features": features(100 + 2 * i + j),
                "max_new_tokens": 3}) for j in range(2)))
            if last:
                break
        return out

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
        asking = asyncio.ensure_future(requests(ac))
        early, late = ([asyncio.ensure_future(ac.put(
            "/v1/adapters/race", content=held(f, gate), headers=AUTH)) for f in part]
            for gate, part in ((False, files[1:-gated]), (True, files[-gated:])))
        await asyncio.wait_for(asyncio.gather(*early), 60)
        deleted = await ac.delete("/v1/adapters/race", headers=AUTH)
        release.set()
        await asyncio.wait_for(asyncio.gather(*late), 60)
        puts_done.set()
        answers = await asyncio.wait_for(asking, 120)
    return [t.result() for t in early + late], deleted, answers


def test_20_concurrent_uploads_of_one_id_while_it_is_used_and_deleted(served, tiny_t5):
    """Every answer is one complete version's (the same as that version run alone), or a 404
    between the delete and the next upload; every upload gets its own version; the id's latest
    version afterwards is the newest upload; no temp file is left."""
    client, backend, _ = served
    files = [make_adapter(tiny_t5, kind, 10 + i) for i, kind in
             enumerate(["lora", "adapter", "vlpet", "lora", "adapter"] * 4)]
    assert client.put("/v1/adapters/race", content=files[0], headers=AUTH).status_code == 201
    uploads, deleted, answers = asyncio.run(
        _uploads_and_requests_around_a_delete(client.app, files, gated=10))
    assert [r.status_code for r in uploads] == [201] * 19, [r.text for r in uploads]
    assert deleted.status_code == 200, deleted.text
    by_sha = {hashlib.sha256(f).hexdigest(): f for f in files}
    versions = {1: files[0], **{r.json()["version"]: by_sha[r.json()["sha256"]] for r in uploads}}
    assert sorted(versions) == list(range(1, 21))
    after_delete = {r.json()["version"] for r in uploads[-10:]}
    answered = []
    for r in answers:
        if r.status_code == 404:
            assert r.json()["error"]["code"] == "adapter_not_found"
            continue
        assert r.status_code == 200, r.text
        got, body = r.json(), json.loads(r.request.content)
        expected = run_alone(tiny_t5, {"race": versions[got["adapter_version"]]}, "/v1/vqa",
                             {**body, "num_beams": 1})
        assert (got["answer"], got["logprob"]) == (expected.text, pytest.approx(
            expected.logprob, abs=2e-3)), got["adapter_version"]
        answered.append(got["adapter_version"])
    assert set(answered) - after_delete and set(answered) & after_delete, answered
    latest = client.get("/v1/adapters/race").json()
    assert latest["version"] == max(after_delete)
    assert latest["sha256"] == hashlib.sha256(versions[max(after_delete)]).hexdigest()
    assert not list(backend.store.root.rglob(".tmp-*"))
