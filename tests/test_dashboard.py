"""The live dashboard: over HTTP and in headless Chromium, safe to act (Host check, token, POST)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

import sim_client
from harness_sim import (
    free_port,
    pid_alive,
    running_server,
    wait_until,
)
from tests.shared import (
    DASHBOARD_TOKEN,
    chromium,
    dom_when,
    http_get,
    http_request,
    run_server_cli,
)

# --- the live dashboard -------------------------------------------------------

def step_count_in(dom: str) -> int:
    import re

    return int(re.search(r'<td class="step">(\d+)</td>', dom).group(1))


@contextlib.contextmanager
def running_dashboard(*args: str, host: str = "127.0.0.1"):
    """A mock server with its dashboard on a free port (`server.dashboard` is the page's URL) and a
    known token."""
    port = free_port()
    with running_server("mock", "--dashboard", f"{host}:{port}", *args,
                        env={"SIM_MOCK_IMAGE_SIZE": "64", "SIM_MOCK_EPISODE_STEPS": "100000",
                             "SIM_DASHBOARD_TOKEN": DASHBOARD_TOKEN}) as server:
        server.dashboard = f"http://127.0.0.1:{port}/"
        yield server


@pytest.fixture
def dashboard_server():
    with running_dashboard() as server:
        yield server


def dashboard_status(server) -> dict:
    return json.loads(http_get(server.dashboard + "api/status")[1])


def shows_the_session(dom: str) -> bool:
    return ('<td class="task">reach_corner</td>' in dom and 'class="thumb"' in dom
            and 'src="data:image/png;base64,' in dom and '<td class="step">' in dom)


def not_blank(screenshot) -> bool:
    from PIL import Image

    if not os.path.exists(screenshot):
        return False
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    return pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.fixture
def reaping_dashboard_server():
    with running_dashboard("--session-timeout", "2") as server:
        yield server


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_in_chromium_shows_the_task_growing_steps_and_a_camera_and_survives_a_reap(
        tmp_path, reaping_dashboard_server):
    dashboard_server = reaping_dashboard_server
    stop = threading.Event()

    def step_until_stopped():
        with sim_client.SimulatorClient(dashboard_server.address, timeout_s=30) as sim:
            sim.load_task("reach_corner")
            sim.reset()
            while not stop.is_set():
                sim.step(np.zeros(7))
                time.sleep(0.01)

    stepper = threading.Thread(target=step_until_stopped)
    stepper.start()
    screenshot = tmp_path / "dashboard.png"
    try:
        assert wait_until(lambda: any((row["step"] or 0) > 0 for row in dashboard_status(dashboard_server)["sessions"]))
        first = dom_when(dashboard_server.dashboard, shows_the_session, "the stepping session")
        assert "mock" in first
        dom_when(dashboard_server.dashboard, lambda dom: shows_the_session(dom) and
                 step_count_in(dom) > step_count_in(first), "a step count growing between two loads")
        assert wait_until(lambda: chromium(f"--screenshot={screenshot}", "--window-size=1200,700",
                                           "--virtual-time-budget=3000", dashboard_server.dashboard)
                          and not_blank(screenshot))
    finally:
        stop.set()
        stepper.join()
    assert wait_until(lambda: dashboard_status(dashboard_server)["sessions"] == [])  # reaped after 2 s idle
    dom_when(dashboard_server.dashboard, lambda dom: "no sessions" in dom and "sessions in use / max" in dom
             and '<p class="muted" id="updated">updated ' in dom, "an empty, updated session table")


def test_dashboard_reads_with_get_acts_only_by_post_with_its_token_and_bounds_requests(dashboard_server):

    status = dashboard_status(dashboard_server)
    assert status["server"]["curve"] is False and status["server"]["admin"] is False
    assert "key" not in json.dumps(status).lower() and DASHBOARD_TOKEN not in json.dumps(status)
    client = dashboard_server.client()
    client.request("load_task", task_name="reach_center")
    session_id = client.request("get_info")["session_id"]
    rows = []

    def shown() -> bool:  # the page shows the loop's snapshot, made once a second: one may predate the load
        rows[:] = [row for row in dashboard_status(dashboard_server)["sessions"]
                   if row["session_id"] == session_id and row["task"] == "reach_center"]
        return bool(rows)

    assert wait_until(shown)
    assert rows[0]["peer"].startswith("127.0.0.1:") and rows[0]["worker_pid"] > 0
    assert http_get(dashboard_server.dashboard + "x" * 3000)[0] == 414  # request line too long
    end = dashboard_server.dashboard + "api/end"
    assert http_get(end + f"?session={session_id}")[0] == 405  # a GET never acts
    code, body = http_request("POST", end, {"session": session_id}, {"X-Sim-Token": DASHBOARD_TOKEN})
    assert code == 403 and b"--dashboard-admin" in body
    assert http_get(dashboard_server.dashboard + "nothing")[0] == 404
    port = int(dashboard_server.dashboard.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"PUT /api/status HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 501")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]  # slow clients that never send:
    try:  # they hold HTTP threads, not the loop
        assert client.request("reset")["status"] == "ok"
        assert client.request("step", action=[0.0] * 7)["status"] == "ok"
        assert client.request("get_info")["session_id"] == session_id
    finally:
        for connection in silent:
            connection.close()


def test_dashboard_refuses_a_foreign_host_so_a_rebound_dns_name_reads_nothing(dashboard_server):
    port = int(dashboard_server.dashboard.rsplit(":", 1)[1].strip("/"))
    for path in ("", "api/status", "api/thumbnails"):
        code, body = http_get(dashboard_server.dashboard + path, Host=f"evil.example:{port}")
        assert code == 403 and b"Host" in body and b"sessions" not in body
    code, _ = http_request("POST", dashboard_server.dashboard + "api/end", {"session": "x"},
                           {"Host": "evil.example", "X-Sim-Token": DASHBOARD_TOKEN})
    assert code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert http_get(dashboard_server.dashboard + "api/status", Host=host)[0] == 200


def test_dashboard_admin_ends_a_session_only_by_a_post_with_the_token():
    with running_dashboard("--dashboard-admin") as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        info = client.request("get_info")
        end, body = server.dashboard + "api/end", {"session": info["session_id"]}
        assert http_get(end + f"?session={info['session_id']}")[0] == 405
        assert http_request("POST", end, body)[0] == 403  # no token
        assert http_request("POST", end, body, {"X-Sim-Token": "guess"})[0] == 403
        assert http_request("POST", end, body, {"Cookie": f"sim_dashboard_token={DASHBOARD_TOKEN}"})[0] == 403
        assert http_request("POST", end, {"session": 5}, {"X-Sim-Token": DASHBOARD_TOKEN})[0] == 400
        assert client.request("get_info")["session_id"] == info["session_id"]  # nothing of that ended it
        code, _ = http_request("POST", end, body, {"X-Sim-Token": DASHBOARD_TOKEN})
        assert code == 200  # asked; the loop ends the session at its next tick
        assert wait_until(lambda: not pid_alive(info["sim_pid"]))
        assert client.request("get_info")["session_id"] != info["session_id"]  # a new session


def test_dashboard_beyond_loopback_needs_the_token_to_be_read_too():
    with running_dashboard(host="0.0.0.0") as server:
        status = server.dashboard + "api/status"
        assert http_get(status)[0] == 403
        assert http_get(status + "?token=guess")[0] == 403
        assert http_get(status + f"?token={DASHBOARD_TOKEN}")[0] == 200
        code, _ = http_get(server.dashboard, Cookie=f"sim_dashboard_token={DASHBOARD_TOKEN}")
        assert code == 200


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_page_keeps_the_logged_token_and_offers_actions_only_with_it_in_chromium():
    with running_dashboard("--dashboard-admin") as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        session_id = client.request("get_info")["session_id"]
        assert wait_until(lambda: any(row["session_id"] == session_id
                                      for row in dashboard_status(server)["sessions"]))
        dom_when(server.dashboard, lambda dom: "open the logged URL with its token" in dom and "<button>" not in dom,
                 "no action without the token")
        dom_when(server.dashboard + f"?token={DASHBOARD_TOKEN}", lambda dom: "<button>end</button>" in dom,
                 "the end button once the token is kept")


@pytest.mark.parametrize("value, message", [("http", "expected PORT or HOST:PORT"), ("1.2.3.4:99999", "PORT")])
def test_bad_dashboard_address_exits_with_one_line(value, message):
    result = run_server_cli("--simulator", "mock", "--dashboard", value)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
