"""The web studio: one tab per modality plus Runs, served by Gradio on 127.0.0.1 by default.

The server never trains: it queues runs (studio.jobs starts each in its own process) and reads their
events. A background thread keeps the queue moving and notices runs whose process died.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from pipelines import MODALITIES, archives
from pipelines.data import int_setting
from pipelines.hub import workspace
from studio import jobs, page
from studio.runs import Registry
from studio.tabs import widgets

CSS = """
.run-status { min-height: 3em; }
.hardware { opacity: 0.8; font-size: 0.9em; }
.live-refresh { display: none !important; }
#studio-offline { position: fixed; top: 0; left: 0; right: 0; z-index: 1000; padding: 0.6em 1em; text-align: center;
                  background: #fff3cd; color: #664d03; border-bottom: 1px solid #ffda6a; }
.live-curve-empty { opacity: 0.7; }
/* a data preview shows a cell's line breaks: a prompt's lines and a chat's turns ran together */
.keeps-lines .cell-wrap span.text { white-space: pre-wrap !important; }
/* a disabled Cancel: grey, not a faded red, as there is nothing to cancel */
button.stop:disabled { background: var(--button-secondary-background-fill); color: var(--body-text-color-subdued);
                       border-color: var(--button-secondary-border-color); }
"""
MAX_UPLOAD_MB = int_setting("STUDIO_MAX_UPLOAD_MB", 2048)


def build_app() -> gr.Blocks:
    from studio.tabs import image, llm, runs_tab, speech
    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown("# LoRA Studio\nFine-tune language, image and speech models with LoRA, in your browser.")
        tabs = {}
        items = {}
        with gr.Tabs() as tab_set:
            for modality, module in (("llm", llm), ("image", image), ("speech", speech)):
                with gr.Tab(MODALITIES[modality], id=modality) as items[modality]:
                    tabs[modality] = module.build()
            with gr.Tab("Runs", id="runs") as runs_item:
                runs_parts = runs_tab.build(tab_set, {m: parts["load_outputs"] for m, parts in tabs.items()},
                                            {m: parts["run_state"] for m, parts in tabs.items()})
        runs_tab.poll_while_shown(runs_parts, runs_item, list(items.values()))
        for modality, item in items.items():  # (a finished run's panel is not polled: checked when shown)
            item.select(widgets.still_there(modality), tabs[modality]["run_state"], tabs[modality]["run_state"],
                        api_visibility="private")
        _api()
        for modality, parts in tabs.items():
            widgets.keep_drafts(app, parts["form"], parts["load_outputs"])
            # A page opened or reloaded shows the newest run of each tab, with its whole curve so far,
            # and checks the preselected sample data so Train is ready.
            app.load(lambda modality=modality: widgets.latest_run_id(modality), None, parts["run_state"],
                     api_visibility="private")
            check, inputs, outputs, triggers = parts["check"]
            # One listener for that and for every change the check reads: the page runs it one at a time and,
            # while one runs, keeps only the newest request. Listeners of their own ran side by side, and the
            # one that ended last was shown: on a busy machine, the preselected sample's check over the file
            # the user had just uploaded (Train enabled for data it did not hold).
            gr.on([app.load, *triggers], check, inputs, outputs, api_visibility="private", trigger_mode="always_last")
    return app


def _api() -> None:
    """A small, stable HTTP API for scripts (see the README's gradio_client example)."""
    from studio import api
    gr.api(api.start_run, api_name="start_run")
    gr.api(api.run_status, api_name="run_status")
    gr.api(api.generate, api_name="generate")
    gr.api(api.stop_run, api_name="stop_run")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def read_credentials(auth_file: str | None) -> list[tuple[str, str]]:
    """Users from a file of 'user:password' lines, or STUDIO_AUTH='user:password' in the environment.
    Never from a command-line argument, which would land in shell history and the process list."""
    lines: list[str] = []
    if auth_file:
        lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
    elif os.environ.get("STUDIO_AUTH"):
        lines = os.environ["STUDIO_AUTH"].split(",")
    users = []
    for line in lines:
        user, sep, password = line.strip().partition(":")
        if line.strip() and not line.startswith("#"):
            if not sep or not user or len(password) < 8:
                raise ValueError("each credential must be 'user:password' with a password of at least 8 characters")
            users.append((user, password))
    return users


@contextlib.asynccontextmanager
async def _studio_routes(server_app):
    """The studio's own routes and early script, added as the server starts up: uvicorn finishes the app's
    start-up before it takes a connection, so no page or poll ever meets the server without them."""
    page.serve_live_updates(server_app)
    page.run_early_script(server_app)
    yield


def _poll_queue_gently(app: gr.Blocks, seconds: float = 0.1) -> None:
    """Gradio's queue looks for new events every 1 ms while idle (and for progress every 10 ms): about 8%
    of a core spent waiting, which on a machine of few cores comes out of the training run's share (every
    20 ms still cost 1%, every 100 ms 0.5%). Since the live panels refresh outside the queue (studio/page.py),
    its events are the user's own clicks, and 100 ms at most before one starts is hardly seen."""
    queue = getattr(app, "_queue", None)
    for attribute in ("sleep_when_free", "progress_update_sleep_when_free"):
        if hasattr(queue, attribute):
            setattr(queue, attribute, max(getattr(queue, attribute), seconds))


def _keep_queue_moving(stop: threading.Event, app: gr.Blocks) -> None:
    """Start queued runs as slots free up; once an hour (and at start), remove uploads left unused."""
    cleaned = None
    while not stop.wait(3.0):
        try:
            jobs.dispatch()
            if cleaned is None or time.monotonic() - cleaned > 3600:
                cleaned = time.monotonic()
                clean_unused(app)
        except Exception as err:  # a hiccup (a locked database) must not end the thread
            print(f"queue check failed: {err}", file=sys.stderr)


def clean_unused(app: gr.Blocks, hours: float = archives.KEEP_UNUSED_HOURS) -> None:
    """What uploads leave, removed once nothing has used it for `hours`: unpacked zips and gathered folders, the
    image preview's thumbnails, and Gradio's own copies of the uploads (its cache), but those of the files the page
    is built with (the tabs' sample data). An upload a page's form holds is used at each of its checks and Train
    (TabForm.values). Not Gradio's delete_cache: it removes only what its own process made (a killed server's
    files stayed for good), and all of that whenever the server stops (an open page's uploads with it)."""
    from gradio.utils import get_upload_folder

    from studio.tabs import image
    for folder in ("uploads", "unpacked"):  # (the second: where speech zips went before)
        archives.clean_unused(workspace() / folder, hours)
    archives.clean_unused_files(image.previews_folder(), hours)
    built_with = {os.path.realpath(path) for block in app.blocks.values()
                  for path in getattr(block, "keep_in_cache", ())}
    archives.clean_unused_files(Path(get_upload_folder()), hours, built_with)


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth_file: str | None = None,
          block: bool = True):
    users = read_credentials(auth_file)
    if not _is_loopback(host) and not users:
        print(f"error: refusing to listen on {host} without authentication. Put 'user:password' lines in a file "
              "and pass --auth-file FILE, or set STUDIO_AUTH in the environment.", file=sys.stderr)
        return 2
    if share and not users:
        print("error: a public share link needs authentication too (--auth-file or STUDIO_AUTH).", file=sys.stderr)
        return 2
    jobs.yield_cpu_to_training()  # before any server thread starts, so they all inherit the lower priority
    registry = Registry()
    lost = jobs.reconcile(registry)
    if lost:
        print(f"Marked {len(lost)} run(s) whose process is gone as interrupted: {', '.join(lost)}")
    jobs.dispatch(registry)
    # The libraries the handlers load, imported as the page is first served (not delaying it), before the first
    # data check asks for them: the checks, Try it and Export wait for it.
    jobs.import_libraries_in_background()
    started = time.monotonic()
    # Gradio's cache of uploads, a folder of the studio's own: the default is every Gradio app's of this user,
    # and clean_unused removes what the studio did not use for a day.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "studio-gradio"))
    app = build_app()
    stop = threading.Event()
    threading.Thread(target=_keep_queue_moving, args=(stop, app), daemon=True).start()
    app.queue(default_concurrency_limit=4, max_size=256)
    _poll_queue_gently(app)
    root = workspace()
    allowed, blocked = widgets.served_paths()
    app.launch(server_name=host, server_port=port, share=share, auth=users or None, inbrowser=False,
               allowed_paths=[str(p) for p in allowed], blocked_paths=[str(p) for p in blocked],
               max_file_size=f"{MAX_UPLOAD_MB}mb", prevent_thread_lock=True, show_error=True, css=CSS,
               footer_links=["api"], quiet=True, mcp_server=False, ssr_mode=False,
               head=f"<script>{page.LIVE_JS.read_text()}</script>", app_kwargs={"lifespan": _studio_routes})
    print(f"LoRA Studio is ready on http://{host}:{port} (started in {time.monotonic() - started:.1f} s). "
          f"Workspace: {root}", flush=True)
    if not block:
        return app
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop.set()
        app.close()
    return 0
