"""schemathesis hooks for ticketd (loaded through schemathesis.toml's `hooks`).

Both make a schema-valid request valid for ticketd too, where the schema cannot say
all of it, so that the positive_data_acceptance check stays on for every operation.

1. A fresh Idempotency-Key for every schema-valid request. schemathesis draws header
values from a small space, so two valid requests with different bodies often share
a key; ticketd then answers 422 "already used with a different request", as the
IETF draft says it must, and the positive_data_acceptance check calls that a valid
request refused. A real client sends a new key per request, so valid requests get
one; hostile (negative) requests keep whatever key schemathesis generated. Key
reuse itself is tested in tests/ (the Rust suite), where the order is known.

2. POST /event: `max_per_user` at most `capacity`, a rule between two fields that JSON
Schema cannot state (the spec says it in words); ticketd answers 422 past it.

3. Integer path and query parameters written as decimal digits. JSON Schema counts 128.0
as an integer, and the stateful phase sometimes puts such a float in a URL as "128.0";
ticketd wants ids in URLs as plain digits (422 otherwise, on purpose), as every client
writes them. In JSON bodies it accepts 128.0.
"""

import uuid

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    for name in list(case.headers or {}):
        if name.lower() == "idempotency-key":
            case.headers[name] = uuid.uuid4().hex
    body = case.body
    if (case.operation.method.upper(), case.operation.path) == ("POST", "/event") \
            and isinstance(body, dict) and _int(body.get("capacity")) and _int(body.get("max_per_user")) \
            and body["max_per_user"] > body["capacity"]:
        body["max_per_user"] = body["capacity"]
    for params in (case.path_parameters, case.query):
        for name, value in (params or {}).items():
            if isinstance(value, float) and value.is_integer():
                params[name] = int(value)


def _int(value):
    """An integer as JSON Schema counts them: 202 and 202.0 alike (ticketd accepts both)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
