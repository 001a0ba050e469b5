"""Runs outlive the server: kill -9 the server mid-run, start it again, and the run is still training, shown
live; queued runs keep their order and start by themselves."""

import os
import signal
import time

from gradio_client import Client, handle_file

from studio.runs import Registry
from tests.browser import ROOT, Server, free_port
from tests.test_runs import steps, wait_for

SAMPLE = handle_file(str(ROOT / "assets" / "llm" / "sample.csv"))


def config_text(max_steps: int, name: str) -> str:
    text = (ROOT / "assets" / "llm" / "config.yaml").read_text()
    return text.replace("epochs: 30", f"max_steps: {max_steps}").replace("name: zorbia-facts", f"name: {name}") \
        .replace("sample_every: 30", "sample_every: 0")


def test_kill_the_server_mid_run_and_restart(tmp_path):
    home = tmp_path / "ws"
    home.mkdir()
    port = free_port()
    server = Server(home, port)
    client = Client(server.url, verbose=False)
    running = client.predict(config_text(100000, "long"), [SAMPLE], api_name="/start_run")
    queued = [client.predict(config_text(3, f"next-{i}"), [SAMPLE], api_name="/start_run") for i in range(2)]
    registry = Registry(home)
    wait_for(lambda: steps(home, running), what="the first step")
    os.kill(server.process.pid, signal.SIGKILL)  # no clean shutdown
    server.process.wait()
    before = len(steps(home, running))
    wait_for(lambda: len(steps(home, running)) > before + 3, what="training to go on with no server")
    assert registry.get(running).status == "running"
    assert [r.id for r in registry.queue()] == queued

    server = Server(home, port)
    try:
        client = Client(server.url, verbose=False)
        status = client.predict(running, api_name="/run_status")
        assert status["status"] == "running" and len(status["losses"]) >= before
        time.sleep(2)
        later = client.predict(running, api_name="/run_status")
        assert later["step"] > status["step"]  # still training, seen live through the new server
        assert client.predict(running, api_name="/stop_run") == "stopping"
        wait_for(lambda: registry.get(running).status == "stopped", what="the stop")
        # The queue moves on in its order, by itself.
        wait_for(lambda: all(registry.get(q).status == "completed" for q in queued), what="the queued runs")
        assert registry.get(queued[0]).started <= registry.get(queued[1]).started
    finally:
        server.stop()


def test_a_page_says_when_the_server_is_not_answering(tmp_path, page):
    """With the server down, a page's panels froze at their last state with nothing said; Gradio told of the lost
    connection only after a click."""
    from playwright.sync_api import expect
    home = tmp_path / "ws"
    home.mkdir()
    server = Server(home, free_port())
    page.goto(server.url)
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24")
    expect(page.locator("#studio-offline")).to_have_count(0)
    server.stop()
    expect(page.locator("#studio-offline")).to_contain_text("The studio's server is not answering", timeout=30_000)
