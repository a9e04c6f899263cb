"""`chatsmith serve` as a user starts it: a bad or busy port is one line and exit 2, said before
anything is printed as serving; "serving" is printed once the socket accepts connections."""

import socket
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, cli_subprocess


def test_port_out_of_range_is_one_line_exit_2(base_model):
    r = cli_subprocess("serve", base_model, "--port", 99999, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --port must be in 1-65535, got 99999"
    assert "serving" not in r.stdout and "Traceback" not in r.stderr


def test_port_in_use_is_one_line_exit_2(base_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = cli_subprocess("serve", base_model, "--port", port, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: "), lines
    assert "serving" not in r.stdout


def test_serving_is_printed_once_the_port_is_bound(base_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", str(base_model), "--port", str(port)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("serving "), line
        # the socket is bound and listening when the line is printed: a connection is accepted (it
        # waits in the backlog until uvicorn's loop takes it)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60)
        assert r.status_code == 200
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("serve did not stop on SIGTERM")
