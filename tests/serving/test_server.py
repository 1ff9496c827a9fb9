"""The online service over real HTTP (issue 13 items 4, 6): ranking, metadata, bad requests answered 4xx naming the
field while the server keeps serving, a cold item with text vs without, micro-batched concurrent requests equal to
one-by-one answers, the structured access log and a graceful shutdown."""
from __future__ import annotations

import concurrent.futures
import json
import signal

import httpx
import pyarrow.parquet as pq
import pytest
from serving_helpers import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ml_model, serving_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc, url = start_server(ml_model["bundle"], serving_env, log, "--max-candidates", "50",
                             "--max-body-bytes", "20000")
    yield {"proc": proc, "url": url, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def rows(ml_model):
    return pq.read_table(ml_model["test"]).slice(0, 400).to_pylist()


def _request(rows, i: int, n: int = 20):
    r = rows[i]
    return {"domain": r["domain"], "context": {"user_id": r["user_id"], "hist_item_ids": r["hist_item_ids"],
                                                "query": r["query"]},
            "candidates": [{"item_id": x["item_id"]} for x in rows[i:i + n]]}


def _rank(url, body, **kw):
    return httpx.post(url + "/rank", json=body, timeout=60, **kw)


def test_rank_sorts_candidates_by_score(server, rows):
    body = _request(rows, 0)
    res = _rank(server["url"], body)
    assert res.status_code == 200, res.text
    ranked = res.json()["ranked"]
    scores = [c["score"] for c in ranked]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert sorted(c["index"] for c in ranked) == list(range(len(body["candidates"])))
    assert all(c["item_id"] == body["candidates"][c["index"]]["item_id"] for c in ranked)
    top = _rank(server["url"], dict(body, top_k=3)).json()["ranked"]
    assert top == ranked[:3]


def test_healthz_and_metadata(server, ml_model):
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}
    meta = httpx.get(server["url"] + "/metadata").json()
    assert [d["name"] for d in meta["domains"]] == ["ml_action", "ml_comedy", "ml_drama", "ml_tag_search"]
    assert "user_id" in meta["context_fields"] and "item_id" in meta["candidate_fields"]
    assert {"text", "genres", "year"} <= set(meta["candidate_optional_fields"])
    from recsys.data.resolved import sha256_file

    assert meta["bundle_sha256"] == sha256_file(ml_model["bundle"] / "manifest.json")


@pytest.mark.parametrize("mutate,status,field", [
    (lambda b: b.update(domain="nope"), 422, "domain"),
    (lambda b: b["context"].pop("user_id"), 422, "context.user_id"),
    (lambda b: b["context"].update(hist_item_ids="1,2"), 422, "context.hist_item_ids"),
    (lambda b: b["candidates"][3].update(year="soon"), 422, "candidates.3.year"),
    (lambda b: b["candidates"][2].pop("item_id"), 422, "candidates.2.item_id"),
    (lambda b: b["candidates"][0].update(colour="red"), 422, "candidates.0.colour"),
    (lambda b: b.update(candidates=b["candidates"] * 3), 422, "candidates"),  # 60 > --max-candidates 50
    (lambda b: b.update(candidates=[]), 422, "candidates"),
])
def test_bad_requests_get_4xx_naming_the_field(server, rows, mutate, status, field):
    body = _request(rows, 0)
    mutate(body)
    res = _rank(server["url"], body)
    assert res.status_code == status, res.text
    assert res.json()["field"] == field and res.json()["error"].startswith(field)
    assert _rank(server["url"], _request(rows, 0)).status_code == 200  # still serving


def test_malformed_and_oversized_bodies(server, rows):
    res = httpx.post(server["url"] + "/rank", content=b'{"domain": ', timeout=30)
    assert res.status_code == 400 and res.json()["field"] == "body"
    big = _request(rows, 0)
    big["context"]["query"] = "x" * 30000
    res = _rank(server["url"], big)
    assert res.status_code == 413 and res.json()["field"] == "body"
    res = httpx.post(server["url"] + "/rank", content=b"[1, 2]", timeout=30)
    assert res.status_code == 422
    assert _rank(server["url"], _request(rows, 0)).status_code == 200


def test_cold_item_text_changes_its_score(server, rows):
    """A candidate outside the catalogue: without text it is the unseen row (any two such ids score the same);
    with text, its text is encoded on the fly and moves the score."""
    body = _request(rows, 0, n=2)
    body["candidates"] = [{"item_id": "not-an-item-1"}, {"item_id": "not-an-item-2"},
                          {"item_id": "not-an-item-3", "text": "A haunted house horror film with ghosts",
                           "genres": "Horror|Thriller", "year": 1999},
                          {"item_id": "not-an-item-4", "text": "A haunted house horror film with ghosts",
                           "genres": "Horror|Thriller", "year": 1999}]
    ranked = {c["item_id"]: c["score"] for c in _rank(server["url"], body).json()["ranked"]}
    assert ranked["not-an-item-1"] == pytest.approx(ranked["not-an-item-2"], abs=1e-7)
    assert ranked["not-an-item-3"] == pytest.approx(ranked["not-an-item-4"], abs=1e-7)
    assert abs(ranked["not-an-item-3"] - ranked["not-an-item-1"]) > 1e-5


def test_concurrent_requests_equal_one_by_one(server, rows):
    bodies = [_request(rows, i * 20) for i in range(16)]
    alone = [_rank(server["url"], b).json() for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: _rank(server["url"], b).json(), bodies))
    for a, t in zip(alone, together):
        assert [c["index"] for c in a["ranked"]] == [c["index"] for c in t["ranked"]]
        assert [c["score"] for c in a["ranked"]] == pytest.approx([c["score"] for c in t["ranked"]], abs=1e-6)


def test_access_log_and_graceful_shutdown(server, rows):
    assert _rank(server["url"], _request(rows, 0)).status_code == 200
    server["proc"].send_signal(signal.SIGTERM)
    # uvicorn finishes in-flight requests and the lifespan, then re-raises the signal it caught (exit by SIGTERM)
    assert server["proc"].wait(60) in (0, -signal.SIGTERM)
    log = server["log"].read_text()
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]  # access log: JSON lines
    assert any(r["path"] == "/rank" and r["status"] == 200 and r["candidates"] == 20 for r in lines)
    assert any(r["status"] == 422 for r in lines) and all("ms" in r for r in lines)
    assert "shut down: scorer stopped" in log and "Traceback" not in log
