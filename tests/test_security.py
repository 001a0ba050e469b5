"""The server over HTTP: it binds safely, asks for users off loopback, and serves no file outside its folders."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.browser import ROOT, Server, free_port


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize("path", [
    "/etc/passwd", "//etc/passwd", "/etc/../etc/passwd", "../../../../etc/passwd", "%2Fetc%2Fpasswd",
    "..%2F..%2F..%2Fetc%2Fpasswd", "/ETC/PASSWD",
])
def test_no_file_outside_the_workspace_is_served(server, path):
    for route in ("gradio_api/file=", "file=", "gradio_api/file/", "static/", "assets/"):
        status, body = fetch(server.url + route + path)
        assert b"root:" not in body, (route, path, status)


def test_index_database_and_parent_folders_are_not_served(server):
    for target in (server.home / "studio.db", server.home, server.home.parent / f"server-{server.port}.log",
                   ROOT / "pyproject.toml"):
        status, body = fetch(f"{server.url}gradio_api/file={target}")
        assert status in (403, 404), (target, status)


def test_refuses_a_public_address_without_users(tmp_path):
    result = subprocess.run([sys.executable, "-m", "studio.cli", "serve", "--host", "0.0.0.0", "--port",
                             str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "STUDIO_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in result.stderr


def test_users_from_the_environment_are_required_to_log_in(tmp_path):
    home = tmp_path / "ws"
    home.mkdir()
    srv = Server(home, free_port(), extra_env={"STUDIO_AUTH": "alice:correct-horse"})
    try:
        status, _ = fetch(srv.url + "config")
        assert status == 401
        status, _ = fetch(srv.url + "gradio_api/info")
        assert status == 401
        login = urllib.request.Request(srv.url + "login", data=b"username=alice&password=wrong-password",
                                       method="POST")
        assert fetch_request(login) == 400
        for route in ("studio/live?run=x", "studio/runs"):  # live.js's routes are behind the same login
            assert fetch(srv.url + route)[0] == 401
        login = urllib.request.Request(srv.url + "login", data=b"username=alice&password=correct-horse",
                                       method="POST")
        assert fetch_request(login) == 200
        signed_in = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        signed_in.open(login, timeout=10)
        with signed_in.open(srv.url + "studio/live?run=x", timeout=10) as response:
            assert response.status == 200 and json.loads(response.read())["version"] == "gone"
        with signed_in.open(srv.url + "studio/runs", timeout=10) as response:
            assert response.status == 200 and ":" in json.loads(response.read())["version"]
    finally:
        srv.stop()


def fetch_request(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
