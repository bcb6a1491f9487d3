"""/openapi.json against what the app really answers, in-process (falcon.testing), checked with the
document's own schemas (jsonschema_rs, which schemathesis brings).

A mutation audit found test_openapi_document compares the served document with
openapi_document() itself, and schemathesis never asks for /openapi.json, never sees a 503 nor a
413, and takes 422 as an answer to any schema-valid increment: so the document could say a key
of 256 characters, a value of 2**63, a missing `value` or a comma in an Idempotency-Key is
valid, or leave 405 and 413 out, and every test still passed."""

from __future__ import annotations

import falcon.testing
import jsonschema_rs
import pytest

from daemon.app import create_app
from daemon.openapi import openapi_document
from maxtwo_cli.core import db
from maxtwo_cli.core.counters import INT64_MAX, INT64_MIN, MAX_IDEMPOTENCY_KEY_LENGTH, MAX_KEY_LENGTH
from maxtwo_cli.core.query import ANSWER_SIZE
from maxtwo_cli.core.schema import MAX_POINTS, users
from maxtwo_cli.core.seed import seed_users
from tests.helpers import set_max_number, unreachable_settings

DOCUMENT = openapi_document()


def valid(schema: dict, instance: object) -> bool:
    """Whether `instance` is valid under `schema`, a schema of the document's ($refs resolved)."""
    return jsonschema_rs.validator_for({**schema, "components": DOCUMENT["components"]}).is_valid(instance)


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def check_answer(path: str, method: str, result) -> None:
    """The answer is one the document declares for the operation: its status, content type,
    body schema and required headers."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    status = str(result.status_code)
    assert status in responses, f"{method.upper()} {path}: {status} is not documented"
    response = responses[status]
    for name, header in response.get("headers", {}).items():
        value = result.headers.get(name.lower())
        if header.get("required"):
            assert value is not None, f"{method.upper()} {path} {status}: no {name}"
        if value is not None:
            typed = int(value) if header["schema"].get("type") == "integer" else value
            assert valid(header["schema"], typed), f"{method.upper()} {path} {status}: {name}: {value!r}"
    content = response.get("content")
    if content is None:
        assert result.content == b"", f"{method.upper()} {path} {status}: a body the document does not declare"
        return
    kind = media_type(result.headers["content-type"])
    assert kind in content, f"{method.upper()} {path} {status}: {kind} is not documented ({list(content)})"
    if kind == "application/json":
        assert valid(content[kind]["schema"], result.json), f"{method.upper()} {path} {status}: {result.text}"


@pytest.fixture
def client(settings, engine):
    seed_users(engine, 50)
    return falcon.testing.TestClient(create_app(settings, engine))


def test_every_operation_answers_as_documented(client):
    client.simulate_post("/increment", json={"key": "a", "value": 1})
    for path, request in [("/", "/"), ("/", "/"), ("/healthz", "/healthz"), ("/metrics", "/metrics"),
                          ("/openapi.json", "/openapi.json"), ("/counters/{key}", "/counters/a"),
                          ("/counters/{key}", "/counters/never")]:
        check_answer(path, "get", client.simulate_get(request))


def test_head_is_documented_where_it_is_answered(client):
    client.simulate_post("/increment", json={"key": "a", "value": 1})
    answered = set()
    for path, operations in DOCUMENT["paths"].items():
        result = client.simulate_head(path.replace("{key}", "a"))
        if result.status_code == 405:
            assert "head" not in operations, f"HEAD {path} is documented but answered 405"
            continue
        answered.add(path)
        assert "head" in operations, f"HEAD {path} is answered {result.status_code} but not documented"
        check_answer(path, "head", result)
        assert "405" not in operations["head"]["responses"]
    # `/` answers HEAD 405 (a GET records a query); the others as GET, without the body.
    assert answered == {"/healthz", "/metrics", "/openapi.json", "/counters/{key}"}
    check_answer("/counters/{key}", "head", client.simulate_head("/counters/never"))
    # The HEAD operations are copies: changing one leaves its GET as it was.
    document = openapi_document()
    document["paths"]["/healthz"]["head"]["responses"]["503"]["headers"]["Retry-After"]["required"] = False
    assert document["paths"]["/healthz"]["get"]["responses"]["503"]["headers"]["Retry-After"]["required"] is True


def test_users_at_the_edges_of_the_documented_ranges(settings, engine):
    """User 1 and points of 1 and 100: a random answer rarely holds any of them."""
    seed_users(engine, 2)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == 1).values(points=1))
        conn.execute(users.update().where(users.c.id == 2).values(points=100))
    set_max_number(engine, 0)
    client = falcon.testing.TestClient(create_app(settings, engine))
    answer = client.simulate_get("/")
    assert sorted((user["id"], user["points"]) for user in answer.json["users"]) == [(1, 1), (2, 100)]
    check_answer("/", "get", answer)
    # The documented shape is exactly the answer's: no field the API never sends.
    schemas = DOCUMENT["components"]["schemas"]
    assert set(schemas["QueryAnswer"]["properties"]) == set(answer.json)
    assert set(schemas["User"]["properties"]) == set(answer.json["users"][0])


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_405_is_documented_wherever_it_is_answered(client, method):
    for path, operations in DOCUMENT["paths"].items():
        request = path.replace("{key}", "a")
        if method.lower() not in operations:
            documented = next(iter(operations))
            result = client.simulate_request(method, request)
            assert result.status_code == 405
            check_answer(path, documented, result)  # the document's one place to say so


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        # (a schema-valid body and Idempotency-Key must be taken: 202)
        ({"key": "a" * 255, "value": 1}, {}),
        ({"key": "k", "value": 2**63 - 1}, {}),
        ({"key": "m", "value": -(2**63)}, {}),
        ({"key": "i", "value": 1}, {"Idempotency-Key": "x" * 255}),
        ({"key": "j", "value": 1}, {"Idempotency-Key": "a -+.~"}),
        # (a schema-invalid one refused: 400 or 422)
        ({"key": "a" * 256, "value": 1}, {}),
        ({"key": "", "value": 1}, {}),
        ({"key": "v", "value": 2**63}, {}),
        ({"key": "v", "value": -(2**63) - 1}, {}),
        ({"key": "v"}, {}),
        ({"value": 1}, {}),
        ({"key": "v", "value": 1, "other": 2}, {}),
        ({"key": "v", "value": 1}, {"Idempotency-Key": "x" * 256}),
        ({"key": "v", "value": 1}, {"Idempotency-Key": "a,b"}),
        ({"key": "v", "value": 1}, {"Idempotency-Key": "caf\u00e9"}),
        ({"key": "a\u0000b", "value": 1}, {}),
    ],
)
def test_the_increment_schema_says_exactly_what_the_api_takes(client, body, headers):
    operation = DOCUMENT["paths"]["/increment"]["post"]
    [parameter] = operation["parameters"]
    schema_valid = valid(operation["requestBody"]["content"]["application/json"]["schema"], body) and all(
        valid(parameter["schema"], value) for name, value in headers.items() if name == parameter["name"]
    )
    result = client.simulate_post("/increment", json=body, headers=headers)
    check_answer("/increment", "post", result)
    assert (result.status_code == 202) == schema_valid, (result.status_code, result.text)


@pytest.mark.parametrize(("length", "incremented"), [(1, True), (255, True), (256, False)])
def test_the_counter_key_parameter_says_which_keys_can_be_read(client, length, incremented):
    key = "k" * length
    client.simulate_post("/increment", json={"key": key, "value": 1})
    [parameter] = DOCUMENT["paths"]["/counters/{key}"]["get"]["parameters"]
    result = client.simulate_get(f"/counters/{key}")
    check_answer("/counters/{key}", "get", result)
    assert (result.status_code == 200) == incremented == valid(parameter["schema"], key)


def test_every_503_is_documented_with_its_retry_after_and_body(database_url, tmp_path):
    """The database unreachable: every operation that needs it answers 503 as documented, and
    each documented 503 says Retry-After is always there (it is)."""
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    try:
        for path, method, kwargs in [("/", "get", {}), ("/healthz", "get", {}), ("/counters/{key}", "get", {}),
                                     ("/increment", "post", {"json": {"key": "a", "value": 1}})]:
            result = client.simulate_request(method.upper(), path.replace("{key}", "a"), **kwargs)
            assert result.status_code == 503
            check_answer(path, method, result)
            assert DOCUMENT["paths"][path][method]["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    finally:
        engine.dispose()


def test_413_and_415_are_documented(client):
    for result in (client.simulate_post("/increment", body=b"{" + b" " * 5000 + b"}",
                                        headers={"Content-Type": "application/json"}),
                   client.simulate_post("/increment", body=b"{}", headers={"Content-Type": "text/plain"})):
        check_answer("/increment", "post", result)
    assert result.status_code == 415


def test_a_value_is_an_integer_as_json_writes_it(client):
    """JSON Schema calls 1.0 an integer, the issue refuses it: the document says so in words."""
    schema = DOCUMENT["components"]["schemas"]["Increment"]["properties"]["value"]
    assert "1.0" in schema["description"]
    for value in (b"1.0", b"1e3"):
        result = client.simulate_post("/increment", body=b'{"key": "f", "value": ' + value + b"}",
                                      headers={"Content-Type": "application/json"})
        assert result.status_code == 422, value
        check_answer("/increment", "post", result)


def test_an_idempotency_key_has_no_space_first_or_last():
    """HTTP strips a header value's leading and trailing whitespace: " " arrives empty (a 400)
    and "abc " as "abc", so the document allows neither; a space inside is kept and allowed."""
    [parameter] = DOCUMENT["paths"]["/increment"]["post"]["parameters"]
    assert [valid(parameter["schema"], key) for key in (" ", " a", "a ", "a b", "a", "-", "~ -")] == [
        False, False, False, True, True, True, True]


def test_the_document_is_served_as_the_document_says(client):
    result = client.simulate_get("/openapi.json")
    assert result.json == DOCUMENT
    check_answer("/openapi.json", "get", result)


def test_the_document_states_the_limits_the_core_keeps():
    """A looser limit in the document (3 users, points from 0) is invisible to any check of the
    answers against it: pinned to the core's constants instead."""
    schemas = DOCUMENT["components"]["schemas"]
    assert schemas["QueryAnswer"]["properties"]["users"]["maxItems"] == ANSWER_SIZE
    points = schemas["User"]["properties"]["points"]
    assert (points["minimum"], points["maximum"]) == (1, MAX_POINTS)  # above a hidden number >= 0
    assert schemas["User"]["properties"]["id"]["minimum"] == 1
    for name in ("Increment", "Counter"):
        value = schemas[name]["properties"]["value"]
        assert (value["minimum"], value["maximum"]) == (INT64_MIN, INT64_MAX)
    key = schemas["Increment"]["properties"]["key"]
    assert (key["minLength"], key["maxLength"]) == (1, MAX_KEY_LENGTH)
    [idempotency_key] = DOCUMENT["paths"]["/increment"]["post"]["parameters"]
    assert idempotency_key["schema"]["maxLength"] == MAX_IDEMPOTENCY_KEY_LENGTH
