"""The OpenAPI document: generated from the router and the validators'
schemas, and in step with both."""

import json

import jsonschema

import openapi
import schemas
import wsgi_routes


def document(client):
    r = client.get("/openapi.json")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def test_every_route_is_in_the_spec_and_nothing_else(client):
    spec = document(client)
    in_router = {(m.lower(), openapi.openapi_path(p)) for m, p, *_ in wsgi_routes.ROUTES}
    in_spec = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert in_router == in_spec
    assert set(openapi.ROUTE_DOCS) == {(m, p) for m, p, *_ in wsgi_routes.ROUTES}


def test_request_bodies_are_the_validators_own_schemas(client):
    spec = document(client)
    components = spec["components"]["schemas"]
    capped = ("intake", "schedule", "schedule_patch")
    for name, schema in schemas.SCHEMAS.items():
        expected = json.loads(json.dumps(schema))
        if name in capped:  # with this service's cost cap as max_cost's maximum
            expected["properties"]["max_cost"]["maximum"] = 0.35
        assert components[name] == expected, name
    intake = spec["paths"]["/api/v1/intake"]["post"]
    assert intake["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/intake"}


def test_every_schema_in_the_spec_is_valid_json_schema(client):
    for name, schema in document(client)["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_keyed_routes_declare_the_api_key_and_errors_share_one_shape(client):
    spec = document(client)
    assert spec["openapi"] == "3.1.0"
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-Api-Key"}
    for method, pattern, _, access, _ in wsgi_routes.ROUTES:
        op = spec["paths"][openapi.openapi_path(pattern)][method.lower()]
        assert ("security" in op) == (access != wsgi_routes.PUBLIC
                                      or (method, pattern) in openapi.SECURITY), pattern
        for status in ("400", "404", "429", "500"):
            assert op["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}


def test_error_bodies_match_the_error_schema(client):
    spec = document(client)
    error_schema = spec["components"]["schemas"]["Error"]
    for method, path in (("GET", "/nope"), ("DELETE", "/health"), ("POST", "/api/v1/intake")):
        jsonschema.validate(client.request(method, path, body=b"{").json(), error_schema)


def test_responses_match_their_schemas(client, app):
    spec = document(client)
    schemas = spec["components"]["schemas"]
    resolver = {"$defs": schemas}

    def check(body, name):
        schema = json.loads(json.dumps(schemas[name]).replace("#/components/schemas/", "#/$defs/"))
        jsonschema.validate(body, {**schema, **resolver})

    check(client.get("/").json(), "Root")
    check(client.get("/health").json(), "Health")
    check(client.get("/public/metrics").json(), "Metrics")
    job_id = client.post("/api/v1/intake", {"workflow": "echo", "payload": {}}).json()["job_id"]
    app.services.engine.run_next()
    check(client.get(f"/api/v1/status/{job_id}").json(), "JobStatus")
    check(client.get("/api/v1/jobs").json(), "JobList")
    check(client.post("/api/v1/users/upsert", {"email": "o@example.com"}).json(), "UserCreated")
    check(client.get("/api/v1/usage").json(), "Usage")
    check(client.post("/api/v1/keys", {"name": "k", "role": "client"}).json(), "KeyCreated")
