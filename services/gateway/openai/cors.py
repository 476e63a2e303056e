"""CORS for the HTTP door (aiohttp-cors), so a web page on an allowed origin can call it from a browser:
a chat UI, a playground, the openai SDK with dangerouslyAllowBrowser. Off unless
gateway.http_cors_origins names origins; clients outside a browser never need it.

Preflights (OPTIONS) carry no token, so the router lets them through its auth; the call that follows is
checked as any other. Credentials are bearer tokens sent by the page, never cookies, so no
Allow-Credentials. The headers a client reads besides the body are exposed: the request id, and what the
SDKs' retries follow.
"""
from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from moaa.services.common.logs import REQUEST_ID_HEADER

EXPOSED = (REQUEST_ID_HEADER, "Retry-After", "x-should-retry")
PREFLIGHT_MAX_AGE_S = 600  # Chromium caps a preflight's cache at 2 h, Firefox at 24 h; 10 min picks up a config change


def allow_origins(app: web.Application, origins: list[str]) -> None:
    """Answer preflights and add Access-Control-Allow-Origin on every route of `app` for `origins`."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(allow_credentials=False, allow_headers="*", allow_methods="*",
                                           expose_headers=EXPOSED, max_age=PREFLIGHT_MAX_AGE_S)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)
    app.on_response_prepare.append(_vary_on_origin)


async def _vary_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Allow-Origin echoes the page's origin (or is absent): a cache between must key on it (Fetch standard)."""
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
