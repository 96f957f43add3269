"""A check for .ci/schemathesis.sh, loaded with SCHEMATHESIS_HOOKS.

schemathesis.toml lets the create operations answer a schema-valid request
with 400 or 422 (refusals for reasons of state). This check keeps those
narrow: a 400 to valid input must be a one-sentence refusal, never field
errors (which would mean the server refused what the document allows), and
a 422 only answers a request that carried an Idempotency-Key.
"""

import schemathesis

CREATES = {
    "POST /api/v1/backups/",
    "POST /api/v1/servers/{server_id}/backup/",
    "POST /api/v1/servers/{server_id}/restore/",
}


@schemathesis.check
def create_refusals_are_about_state(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if case.operation.label not in CREATES:
        return None
    if response.status_code == 422:
        keys = {k.lower() for k in (case.headers or {})}
        assert "idempotency-key" in keys, "422 to a request without an Idempotency-Key"
    if response.status_code == 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"detail"}, (
            f"a schema-valid request was refused with field errors: {body}"
        )
        detail = body["detail"]
        assert not detail.startswith(("Idempotency-Key", "JSON parse error")), (
            f"a schema-valid request was refused: {detail}"
        )
    return None
