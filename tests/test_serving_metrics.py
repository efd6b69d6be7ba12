"""/metrics (serving.metrics) in-process: bounded adapter labels, the most-active cap, and an
exposition prometheus_client parses back with the right types."""
from __future__ import annotations

from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from petserve.serving.api import create_app
from petserve.serving.deployments import LocalBackend
from petserve.serving.metrics import HttpMetrics, render
from tests.test_api import AUTH, features, make_adapter, make_backend

FEATS = features(0)


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample called `name` (e.g. a family's `_count`)."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def by_adapter(text: str, name: str, **match) -> dict[str, float]:
    """`name`'s samples whose labels include `match`, summed per adapter label."""
    out: dict[str, float] = {}
    for labels, value in samples(text, name):
        if match.items() <= labels.items():
            out[labels["adapter"]] = out.get(labels["adapter"], 0.0) + value
    return out


@pytest.fixture
def app_with(tiny_t5, tmp_path):
    """(client, backend) of an app on a fresh store that labels at most `max_adapters` ids."""
    with ExitStack() as stack:
        def build(max_adapters: int = 100) -> tuple[TestClient, LocalBackend]:
            backend, config = make_backend(tiny_t5, tmp_path, num_slots=4)
            config = config.model_copy(update={"metrics_max_adapters": max_adapters})
            backend.start()
            stack.callback(backend.stop)
            return stack.enter_context(TestClient(create_app(backend, config))), backend

        yield build


def vqa(client: TestClient, adapter: str | None):
    return client.post("/v1/vqa", json={"adapter": adapter, "features": FEATS,
                                        "question": "what?", "max_new_tokens": 1})


def test_unique_unknown_adapter_ids_leave_the_exposition_flat(app_with):
    client, _ = app_with()
    assert client.get("/v1/adapters/warm-up").status_code == 404
    assert vqa(client, "warm-up").status_code == 404
    client.get("/metrics")                    # its own series appear from the next scrape on
    before = len(client.get("/metrics").content)
    for i in range(500):
        assert client.get(f"/v1/adapters/unknown-{i}").status_code == 404
        assert vqa(client, f"unknown-vqa-{i}").status_code == 404
    text = client.get("/metrics").text
    print(f"/metrics: {before} B before, {len(text)} B after 1000 unique unknown adapter ids")
    assert len(text) - before < 1000          # digits of counters only; was ~2 KB per id
    assert "unknown-" not in text
    requests = by_adapter(text, "petserve_http_requests_total", status="404")
    assert requests == {"_unknown": 1002.0}


def test_an_id_gets_its_label_once_the_store_has_it(app_with, tiny_t5):
    client, _ = app_with()
    assert client.get("/v1/adapters/late").status_code == 404
    assert client.put("/v1/adapters/late", content=make_adapter(tiny_t5, "lora", 1),
                      headers=AUTH).status_code == 201
    assert client.get("/v1/adapters/late").status_code == 200
    assert client.delete("/v1/adapters/late", headers=AUTH).status_code == 200
    assert client.get("/v1/adapters/late").status_code == 404     # known once: keeps its label
    assert client.get("/v1/adapters/bad..id!").status_code == 400
    text = client.get("/metrics").text
    got = {(labels["method"], labels["adapter"], labels["status"]): v for labels, v in
           samples(text, "petserve_http_requests_total")
           if labels["route"] == "/v1/adapters/{adapter_id}"}
    assert got == {("GET", "_unknown", "404"): 1.0, ("PUT", "late", "201"): 1.0,
                   ("GET", "late", "200"): 1.0, ("DELETE", "late", "200"): 1.0,
                   ("GET", "late", "404"): 1.0, ("GET", "", "400"): 1.0}


def test_the_most_active_adapters_keep_their_label_the_rest_sum_under_other(app_with, tiny_t5):
    client, backend = app_with(max_adapters=3)
    for k in range(5):                        # a<k>: one upload and k + 1 answers
        assert client.put(f"/v1/adapters/a{k}", content=make_adapter(tiny_t5, "lora", k),
                          headers=AUTH).status_code == 201
        for _ in range(k + 1):
            assert vqa(client, f"a{k}").status_code == 200
    assert vqa(client, None).status_code == 200
    text = client.get("/metrics").text
    answers = {"a4": 5.0, "a3": 4.0, "a2": 3.0, "_other": 2.0 + 1.0, "_backbone": 1.0}
    assert by_adapter(text, "petserve_http_requests_total", route="/v1/vqa") == answers
    assert by_adapter(text, "petserve_http_request_duration_seconds_count",
                      route="/v1/vqa") == answers
    uploads = by_adapter(text, "petserve_http_requests_total", method="PUT")
    assert uploads == {"a4": 1.0, "a3": 1.0, "a2": 1.0, "_other": 2.0}
    assert by_adapter(text, "petserve_engine_request_seconds_count") == answers
    engine = backend.engine.stats()["requests"]
    other_s = (engine["a0"]["latency_ms_sum"] + engine["a1"]["latency_ms_sum"]) / 1e3
    seconds = by_adapter(text, "petserve_engine_request_seconds_sum")
    assert seconds["_other"] == pytest.approx(other_s) and set(seconds) == set(answers)


def test_the_exposition_parses_with_the_expected_types(app_with, tiny_t5):
    client, _ = app_with()
    client.put("/v1/adapters/one", content=make_adapter(tiny_t5, "lora", 0), headers=AUTH)
    assert vqa(client, "one").status_code == 200
    text = client.get("/metrics").text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {"petserve_http_requests": "counter",
                "petserve_http_request_duration_seconds": "histogram",
                "petserve_engine_queue_length": "gauge", "petserve_engine_steps": "counter",
                "petserve_engine_request_seconds": "summary",
                "petserve_engine_batch_rows": "histogram",
                "petserve_engine_adapters_per_step": "histogram",
                "petserve_engine_prefill_batch_size": "histogram",
                "petserve_slot_pool_hits": "counter", "petserve_slot_pool_resident": "gauge",
                "petserve_adapter_load_seconds": "summary",
                "petserve_adapter_load_read_seconds": "counter",
                "petserve_feature_cache_misses": "counter"}
    assert expected.items() <= types.items()
    rows = samples(text, "petserve_engine_batch_rows_bucket")
    assert [labels["le"] for labels, _ in rows][-2:] == ["256.0", "+Inf"]
    assert [v for _, v in rows] == sorted(v for _, v in rows)           # cumulative
    assert rows[-1][1] == samples(text, "petserve_engine_batch_rows_count")[0][1]


def test_engine_request_stats_are_capped_over_all_replicas():
    def entry(count: int) -> dict:
        return {"count": count, "latency_ms_sum": 10.0 * count}

    stats = {"r1": {"requests": {"a": entry(1), "b": entry(5), "_backbone": entry(2)}},
             "r2": {"requests": {"a": entry(6), "c": entry(4), "d": entry(3)}}}
    text = render(HttpMetrics(), stats, max_adapters=2).decode()    # a: 7, b: 5 over replicas
    counts = {(labels["replica"], labels["adapter"]): v for labels, v in
              samples(text, "petserve_engine_request_seconds_count")}
    assert counts == {("r1", "a"): 1, ("r1", "b"): 5, ("r1", "_backbone"): 2,
                      ("r2", "a"): 6, ("r2", "_other"): 7}
    assert by_adapter(text, "petserve_engine_request_seconds_sum")["_other"] == pytest.approx(0.07)
