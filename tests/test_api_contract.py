"""The API contract: /openapi.json says what the server accepts and answers.

schemathesis (pinned in pyproject.toml) runs every check over every route of a fresh
`petserve serve --no-ray` on the embedded default, stateful phase included (links between
PUT, GET and DELETE of adapters); the per-route exceptions are in tests/schemathesis/schemathesis.toml
with their reasons. The cross-field rules the schema states are checked against the server's own
verdict on hand-made bodies, the Allow headers against the routes, and the limits against the
configuration they come from.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from fastapi.testclient import TestClient

from petserve.serving.api import create_app
from tests.test_api import make_backend, png_bytes
from tests.test_cli_serve import TOKEN
from tests.test_redteam_server import start

CONFIG = Path(__file__).parent / "schemathesis" / "schemathesis.toml"
OPERATIONS = 13


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("contract-server"), "server")
    yield server
    server.kill()


def test_schemathesis_finds_nothing_on_a_fresh_server(server, tmp_path):
    """Every check (`checks.enabled = true` in the config, less its per-route exceptions), every
    operation, all phases (examples, coverage, fuzzing, stateful)."""
    st = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run(
        [str(st), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "25", "--seed", "7",
         "--no-color", "--generation-database", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert f"Tested: {OPERATIONS}" in out and "Stateful" in out, out[-3000:]


# ---- the rules the schema states, against the server's verdict ------------------------------


@pytest.fixture(scope="module")
def served(tiny_t5, tmp_path_factory):
    backend, config = make_backend(tiny_t5, tmp_path_factory.mktemp("store"), num_slots=2,
                                   max_new_tokens_cap=16, max_beams=2, max_context_items=8)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, client.get("/openapi.json").json()
    backend.stop()


def valid(openapi: dict, component: str, body: dict) -> bool:
    schema = {**openapi, "$ref": f"#/components/schemas/{component}"}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


IMAGE = base64.b64encode(png_bytes(0)).decode()
FEATURES = np.zeros((2, 64)).tolist()
BOXES = [[0, 0, 1, 1]] * 2
CONTEXT = [{"text": "colours in french"}]
VQA_BODIES = [   # (body, the server accepts it)
    ({"question": "what?"}, False),                                      # no media
    ({"question": "what?", "image": IMAGE}, True),
    ({"question": "what?", "features": FEATURES}, True),
    ({"question": "what?", "features": FEATURES, "boxes": BOXES}, True),
    ({"question": "what?", "image": IMAGE, "features": FEATURES}, False),  # two media
    ({"question": "what?", "image": IMAGE, "video": IMAGE}, False),
    ({"question": "what?", "image": IMAGE, "boxes": BOXES}, False),       # boxes need features
    ({"question": "what?", "images": [IMAGE, IMAGE]}, True),              # a pair: nlvr
    ({"question": "what?", "images": [IMAGE, IMAGE], "task": "nlvr"}, True),
    ({"question": "what?", "images": [IMAGE, IMAGE], "task": "vqa"}, False),
    ({"question": "what?", "image": IMAGE, "task": "nlvr"}, False),
    ({"question": "what?", "video": IMAGE, "task": "gqa"}, False),
    ({"question": "what?", "image": IMAGE, "adapter": "x", "context": CONTEXT}, False),
    ({"question": "what?", "image": IMAGE, "max_new_tokens": 17}, False),  # over the cap (16)
    ({"question": "what?", "image": IMAGE, "max_new_tokens": 16}, True),
    ({"question": "what?", "image": IMAGE, "num_beams": 3}, False),       # over max_beams (2)
    ({"question": "what?", "features": np.zeros((2, 63)).tolist()}, False),  # not 64 wide
]


@pytest.mark.parametrize("body,accepted", VQA_BODIES, ids=[str(i) for i in range(len(VQA_BODIES))])
def test_the_vqa_schema_admits_what_the_server_accepts(served, body, accepted):
    client, openapi = served
    r = client.post("/v1/vqa", json={"max_new_tokens": 2, **body})
    assert (r.status_code == 200) == accepted, r.text
    assert valid(openapi, "VqaRequest", {"max_new_tokens": 2, **body}) == accepted


def test_the_caption_form_schema_states_its_media_rule(served):
    client, openapi = served
    form = openapi["components"]["schemas"]["CaptionForm"]
    check = jsonschema.Draft202012Validator(form).is_valid
    assert not check({}) and not check({"image": "...", "video": "..."})
    assert check({"image": "..."}) and check({"image": "...", "adapter": ""})   # empty = absent
    assert not check({"features": "[[0]]", "boxes": "[[0,0,1,1]]", "image": "..."})
    assert client.post("/v1/caption", data={"adapter": ""},
                       files={"image": ("a.png", png_bytes(1))}).status_code == 200
    assert client.post("/v1/caption", data={"prompt": ""}).status_code == 422
    # a JSON field sent as null (what a client's None becomes in a form) is not left out
    r = client.post("/v1/caption", data={"features": "null"}, files={"image": ("a.png", png_bytes(1))})
    assert r.status_code == 422 and "null" in r.json()["error"]["message"]


@pytest.mark.parametrize("component,body,ok", [
    ("ClassifyRequest", {"image": IMAGE}, False),                            # neither
    ("ClassifyRequest", {"image": IMAGE, "adapter": "x", "labels": ["a"]}, False),
    ("ClassifyRequest", {"image": IMAGE, "labels": ["a", "b"]}, True),
    ("ClassifyRequest", {"adapter": "x"}, False),                            # no image
    ("AudioClassifyRequest", {"adapter": "x"}, False),
    ("AudioClassifyRequest", {"adapter": "x", "audio": IMAGE}, True),
    ("ContextEntry", {}, False),
    ("ContextEntry", {"text": "a"}, True),
    ("ContextEntry", {"text": "a", "image": IMAGE}, False),
    ("ContextEntry", {"image": IMAGE, "question": "q", "answer": "a"}, True),
    ("ContextEntry", {"image": IMAGE, "question": "q"}, False),
    ("GenerateRequest", {"context": CONTEXT * 9}, False),                   # over 8 items
])
def test_the_other_bodies_state_their_rules(served, component, body, ok):
    assert valid(served[1], component, body) == ok


def test_allow_lists_every_method_of_the_path(served):
    client, _ = served
    for method, path, allow in [("OPTIONS", "/v1/adapters/x", "DELETE, GET, PUT"),
                                ("POST", "/v1/adapters/x", "DELETE, GET, PUT"),
                                ("OPTIONS", "/v1/adapters/x/generate", "POST"),
                                ("PUT", "/v1/adapters/x/generate", "POST"),
                                ("GET", "/v1/adapters/x/generate", "POST"),
                                ("DELETE", "/v1/vqa", "POST"), ("POST", "/v1/adapters", "GET")]:
        r = client.request(method, path)
        assert (r.status_code, r.headers.get("allow")) == (405, allow), (method, path, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_every_route_documents_its_errors_and_the_limits(served):
    _, openapi = served
    for path, operations in openapi["paths"].items():
        for method, op in operations.items():
            documented = {int(s) for s in op["responses"] if s.startswith(("4", "5"))}
            assert 500 in documented and len(documented) >= 2, (method, path)
            for status in documented:
                ref = op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/OpenAIError" if path.startswith(("/v1/chat", "/v1/models"))
                                    else "/ErrorResponse"), (method, path, status)
    vqa = openapi["components"]["schemas"]["VqaRequest"]["properties"]
    assert vqa["max_new_tokens"]["anyOf"][0]["maximum"] == 16
    assert vqa["num_beams"]["maximum"] == 2
    assert vqa["features"]["anyOf"][0]["items"]["maxItems"] == 64
    upload = openapi["paths"]["/v1/adapters/{adapter_id}"]["put"]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["maxLength"] == 4 * 2**20
    assert upload["application/octet-stream"]["schema"]["minLength"] == 1
