"""What the studio adds to Gradio's web server so that a page watching a run costs the machine little: the
fast refresh of the live panels and the Runs table (studio/tabs/live.js and the routes it asks) and a
script that runs before Gradio's own (studio/tabs/early.js).

On a machine of few cores the browser and the server share the CPU with the training run: each per cent of
a core a watching page takes is taken from training (bench/ui_vs_cli.py, BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from studio.tabs import widgets

LIVE_JS = Path(__file__).parent / "tabs" / "live.js"
EARLY_JS = Path(__file__).parent / "tabs" / "early.js"


def _routes(routes):
    """Every route, also those of included routers (FastAPI keeps those inside an _IncludedRouter)."""
    for route in routes:
        yield route
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner:
            yield from _routes(inner)


def serve_live_updates(server_app) -> None:
    """The routes live.js asks, beside Gradio's and behind the same login (Gradio's own login check guards
    them): GET /studio/live?run=ID&version=V for a live panel, GET /studio/runs for the Runs table's version.
    A plain handler costs the server about 3 ms a call; the same function as a Gradio API endpoint cost
    about 50 ms."""
    from fastapi import Depends
    from fastapi.routing import APIRoute

    from studio.tabs import runs_tab

    login = next((route.endpoint for route in _routes(server_app.router.routes)
                  if getattr(getattr(route, "endpoint", None), "__name__", "") == "login_check"), None)
    if login is None:  # never unguarded: without it the panels refresh through their Gradio timers
        print("warning: Gradio's login check was not found: live panels refresh through Gradio's events",
              file=sys.stderr)
        return

    def live(run: str, version: str = "") -> dict:
        return widgets.live_update(run, version)

    def runs() -> dict:
        return {"version": runs_tab.table_version()}

    for path, answer in (("/studio/live", live), ("/studio/runs", runs)):
        # First, so that no route of Gradio's can shadow them.
        server_app.router.routes.insert(0, APIRoute(path, answer, methods=["GET"], dependencies=[Depends(login)]))
    widgets.FAST_REFRESH = True


def run_early_script(server_app) -> None:
    """Put early.js at the top of the page's <head>, before Gradio's modules load. (Gradio's own `head`
    setting is added by its frontend after they have loaded, too late for what early.js changes.)"""
    script = f"<script>{EARLY_JS.read_text()}</script>".encode()
    for route in _routes(server_app.router.routes):
        if getattr(route, "path", None) == "/" and "GET" in getattr(route, "methods", ()):
            route.app = _with_early_script(route.app, script)


def _with_early_script(inner, script: bytes):
    async def app(scope, receive, send):
        start: dict = {}
        body: list[bytes] = []

        async def send_with_script(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body)
            if b"text/html" in dict(start.get("headers", [])).get(b"content-type", b""):
                page = page.replace(b"<head>", b"<head>" + script, 1)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await inner(scope, receive, send_with_script)
    return app
