"""The Falcon app in-process (falcon.testing) on SQLite and PostgreSQL: every endpoint, status
and error body."""

from __future__ import annotations

import logging

import falcon.testing
import pytest

from daemon.app import create_app
from daemon.openapi import openapi_document
from maxtwo_cli.core import db
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from tests.helpers import set_max_number, state, unreachable_settings


@pytest.fixture
def client(settings, engine):
    seed_users(engine, 2000)
    randomize_points(engine)
    return falcon.testing.TestClient(create_app(settings, engine))


def test_get_root_is_the_core_query(client, engine):
    first = client.simulate_get("/")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json["timestamp"] is None
    assert 1 <= len(first.json["users"]) <= 2 or state(engine).max_number == 100
    second = client.simulate_get("/")
    assert second.json["timestamp"] is not None
    # The same chain at full precision in the headers.
    assert "x-maxtwo-previous-at" not in first.headers
    assert second.headers["x-maxtwo-previous-at"] == first.headers["x-maxtwo-recorded-at"]
    assert second.json["timestamp"] == first.headers["x-maxtwo-recorded-at"][:19].replace("T", " ") + "Z"
    assert second.json["users"] == first.json["users"]  # same epoch, same answer
    max_number = state(engine).max_number
    assert all(user["points"] > max_number for user in second.json["users"])


def test_body_is_exactly_the_documented_shape(client):
    client.simulate_get("/")
    body = client.simulate_get("/").text
    assert body.startswith('{"users": [')
    assert '], "timestamp": "' in body and body.endswith('Z"}')


def test_a_new_epoch_changes_the_answer_the_cache_holds(client, engine):
    set_max_number(engine, 0)
    randomize_points(engine)
    before = client.simulate_get("/").json["users"]
    for _ in range(5):
        randomize_points(engine)
        set_max_number(engine, 0)
        # Different epoch: the app must not serve its cached users (which would be `before`).
        after = client.simulate_get("/").json["users"]
        if after != before:
            break
    assert after != before


def test_healthz(client):
    result = client.simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json == {"status": "ok"}


def test_metrics(client):
    client.simulate_get("/")
    client.simulate_get("/nope")
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain")
    text = result.text
    assert 'maxtwo_http_requests_total{method="GET",route="/",status="200"} 1.0' in text
    assert 'maxtwo_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    for name in (
        "maxtwo_http_request_duration_seconds_bucket",
        "maxtwo_randomize_duration_seconds",
        "maxtwo_randomize_last_success_timestamp_seconds",
        "maxtwo_randomize_failures_total",
        'maxtwo_randomize_skipped_total{reason="overlap"}',
        "maxtwo_epoch",
    ):
        assert name in text


def test_openapi_document(client):
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 200
    document = result.json
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/", "/increment", "/counters/{key}", "/healthz", "/metrics", "/openapi.json"}
    assert document == openapi_document()


@pytest.mark.parametrize("path", ["/nope", "/users/1", "/" + "x" * 2000])
def test_unknown_paths_are_json_404(client, path):
    result = client.simulate_get(path)
    assert result.status_code == 404
    assert result.headers["content-type"] == "application/json"
    assert result.json["status"] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/healthz", "/metrics", "/openapi.json"])
def test_wrong_methods_are_json_405(client, method, path):
    result = client.simulate_request(method, path)
    assert result.status_code == 405
    assert result.json["status"] == 405
    assert "GET" in result.headers["allow"]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/openapi.json"])
def test_head_answers_as_get_without_the_body(client, path):
    get = client.simulate_get(path)
    head = client.simulate_head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_of_a_counter_and_of_one_never_incremented(client):
    assert client.simulate_post("/increment", json={"key": "a/b", "value": 2}).status_code == 202
    head = client.simulate_head("/counters/a%2Fb")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["cache-control"] == "no-store"
    assert client.simulate_head("/counters/never").status_code == 404


def test_head_of_the_query_is_refused_for_it_would_record_a_query(client):
    result = client.simulate_head("/")
    assert result.status_code == 405
    assert "HEAD" not in result.headers["allow"] and "GET" in result.headers["allow"]
    assert client.simulate_get("/").json["timestamp"] is None  # no query was recorded


def test_errors_are_json_even_when_the_client_asks_for_xml(client):
    result = client.simulate_get("/nope", headers={"Accept": "application/xml"})
    assert result.status_code == 404
    assert result.headers["content-type"] == "application/json"


def test_unexpected_errors_are_a_generic_500_with_the_traceback_in_the_log(settings, engine, caplog):
    app = create_app(settings, engine)

    class Broken:
        def on_get(self, req, resp):
            raise RuntimeError("secret internals")

    app.add_route("/broken", Broken())
    with caplog.at_level(logging.ERROR):
        result = falcon.testing.TestClient(app).simulate_get("/broken")
    assert result.status_code == 500
    assert result.json["status"] == 500
    assert "secret internals" not in result.text
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_database_unreachable_is_a_503_json_that_reveals_nothing(database_url, tmp_path):
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))

    query = client.simulate_get("/")
    assert query.status_code == 503
    assert query.json["status"] == 503
    assert query.headers["retry-after"] == "5"
    assert "s3cret" not in query.text and "127.0.0.1" not in query.text and "maxtwo.db" not in query.text

    health = client.simulate_get("/healthz")
    assert health.status_code == 503
    assert health.json["status"] == "unavailable"

    metrics = client.simulate_get("/metrics")
    assert metrics.status_code == 200
    assert 'route="/",status="503"' in metrics.text
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # wsgiref's validator; the point
def test_unknown_methods_do_not_make_new_metric_series(client):
    for method in ("X0ZZ", "X1ZZ", "BREW"):
        assert client.simulate_request(method, "/").status_code in (400, 405)
    text = client.simulate_get("/metrics").text
    assert 'method="OTHER"' in text
    assert "X0ZZ" not in text and "BREW" not in text
