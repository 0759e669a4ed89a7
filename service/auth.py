"""Bearer-token access: when CXRLT_API_TOKEN is set, every route but the health probes needs it.

A pure ASGI middleware (it wraps BentoML's own routes too: /docs, /docs.json, /metrics, /info), so no
route can be forgotten. The comparison is constant-time (`hmac.compare_digest`) and the token never
appears in a log line or an answer.
"""

from __future__ import annotations

import hmac
import json
import os

OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz"})
TOKEN_ENV = "CXRLT_API_TOKEN"


def configured_token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_ok(header: str | None, token: str) -> bool:
    """True when `header` is `Bearer <token>` (scheme case-insensitive), compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"


class TokenAuth:
    def __init__(self, app, token: str | None = None):
        self.app, self.token = app, token if token is not None else configured_token()

    async def __call__(self, scope, receive, send):
        if not self.token or scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if bearer_ok(header, self.token):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "this service needs an access token: send the header "
                                    "`Authorization: Bearer <token>` (the value of CXRLT_API_TOKEN)"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="cxrlt"')]})
        await send({"type": "http.response.body", "body": body})
