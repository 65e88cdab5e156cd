"""The live dashboard of sim_server.py: one self-contained page and a JSON endpoint, over HTTP.

    python sim_server.py --simulator libero --dashboard 8080    # then open http://127.0.0.1:8080/

It runs in threads of the server process and never touches the loop's objects: once a second
the loop publishes a snapshot of plain values (and each session's last reply bodies, which it
already holds), and pages are made from that. A session's camera thumbnail and its last reward
are decoded here, only when a page asks, once per new reply. A request has a few seconds and a
few KiB, and at most MAX_CLIENTS are served at once, so a slow or hostile browser costs one of
those threads, never the loop.

Who may do what (as Jupyter does it): every request must name this machine in its Host header
(loopback names, the address it binds, or --dashboard-hosts), else 403, so a web page cannot
rebind its DNS name to 127.0.0.1 and read the dashboard. A token is made at start (or taken from
SIM_DASHBOARD_TOKEN) and logged in the dashboard's URL (`?token=...`); the page keeps it in a
cookie. Reading needs it when the dashboard binds beyond loopback. Every action is a POST carrying
it in the X-Sim-Token header (which no cross-site form can set), and a GET never changes anything.

Routes: GET `/` (the page), `/api/status` (server, sessions, recent warnings: for scripts),
`/api/thumbnails` (session id -> PNG data URL); POST `/api/end` with `{"session": ID}` (only with
--dashboard-admin: ends that session). With --dashboard-admin and --task-dir also the task builder
(server/task_form.py): GET `/tasks` and `/api/tasks/choices`, POST `/api/tasks/check`, `save`, `preview`.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import queue
import secrets
import struct
import threading
import zlib
from collections import deque
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import numpy as np

from server.task_form import PAGE as TASK_PAGE
from server.task_form import TaskForm

THUMBNAIL_PIXELS = 128  # the longer side of a thumbnail
MAX_CLIENTS = 8  # HTTP requests served at once; more are closed unanswered
REQUEST_TIMEOUT_S = 5.0  # a request must arrive whole within this
MAX_REQUEST_LINE = 2048  # bytes of request line (GET path) accepted
RECENT_LOG_LINES = 50
MAX_POST_BYTES = 4096  # an action's JSON body
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "sim_dashboard_token"
TOKEN_HEADER = "X-Sim-Token"
ACTIONS = ("/api/end", "/api/tasks/check", "/api/tasks/save", "/api/tasks/preview")  # POST only
log = logging.getLogger("sim_server")


class RecentLog(logging.Handler):
    """The server's last warnings and errors, for the page."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: deque = deque(maxlen=RECENT_LOG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname, "message": record.getMessage()})


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit RGB or gray image as a PNG file (no filter, zlib level 1)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    color_type = 2 if image.ndim == 3 else 0
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    header = struct.pack("!IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def camera_image(observation: Dict[str, Any]) -> Optional[np.ndarray]:
    """The first camera-like array of an observation (HxWx3 or HxW uint8), preferring *image keys."""
    keys = sorted(observation, key=lambda key: (not key.endswith("image"), key))
    for key in keys:
        value = observation[key]
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and (
                value.ndim == 2 or (value.ndim == 3 and value.shape[2] == 3)):
            return value
    return None


def thumbnail(image: np.ndarray, upside_down: bool) -> np.ndarray:
    step = max(1, -(-max(image.shape[:2]) // THUMBNAIL_PIXELS))  # ceil: never larger than the limit
    small = image[::step, ::step]
    return small[::-1, ::-1] if upside_down else small


def renderer_name(renderer: Dict[str, str]) -> Optional[str]:
    """GL_RENDERER when it was read, else the MUJOCO_GL backend."""
    return renderer.get("GL_RENDERER") or renderer.get("MUJOCO_GL")


def process_rss_mb(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class SessionActivity:
    """A session's counts and last reply bodies, kept by the loop thread between snapshots."""

    def __init__(self) -> None:
        self.episodes = 0  # resets answered ok
        self.episode_steps = 0  # step replies since the last reset
        self.frame_body: Optional[memoryview] = None  # the last reset or step reply
        self.task_body: Optional[memoryview] = None  # the last load_task reply

    def note(self, method: str, body: bytes, ok: bool) -> None:
        view = memoryview(body).toreadonly()  # the loop never changes a reply body once read
        if method == "load_task":
            self.task_body = view
            return
        self.frame_body = view
        if method == "step":
            self.episode_steps += 1
        elif ok:
            self.episodes += 1
            self.episode_steps = 0


class SessionView:
    """What the page shows of one session's last replies, decoded once per new reply body."""

    def __init__(self) -> None:
        self.frame_body: Any = None
        self.task_body: Any = None
        self.upside_down = False
        self.summary: Dict[str, Any] = {}
        self.thumbnail_url: Optional[str] = None

    def refresh(self, row: Dict[str, Any], decode: Callable[[bytes], Dict[str, Any]]) -> None:
        if row["task_body"] is not self.task_body:
            self.task_body = row["task_body"]
            task_info = self._decoded(decode, self.task_body).get("task_info") or {}
            self.upside_down = bool(task_info.get("images_rotated_180"))
        if row["frame_body"] is self.frame_body:
            return
        self.frame_body = row["frame_body"]
        reply = self._decoded(decode, self.frame_body)
        info = reply.get("info") if isinstance(reply.get("info"), dict) else {}
        self.summary = {"step": info.get("step"), "reward": reply.get("reward"), "success": info.get("success")}
        image = camera_image(reply.get("observation") or {})
        self.thumbnail_url = None
        if image is not None:
            png = png_bytes(thumbnail(image, self.upside_down))
            self.thumbnail_url = "data:image/png;base64," + base64.b64encode(png).decode()

    @staticmethod
    def _decoded(decode, body) -> Dict[str, Any]:
        if body is None:
            return {}
        try:
            reply = decode(body)
        except Exception:  # a reply the client got is not the dashboard's to judge
            return {}
        return reply if reply.get("status") == "ok" else {}


class DashboardState:
    """The page's data, made from the loop's latest snapshot only (page requests run on several threads)."""

    def __init__(self, decode: Callable[[bytes], Dict[str, Any]], recent_log: RecentLog) -> None:
        self.decode = decode
        self.recent_log = recent_log
        self.snapshot: Dict[str, Any] = {"simulators": {}, "session_rows": []}  # replaced whole, never changed
        self.views: Dict[str, SessionView] = {}
        self.lock = threading.Lock()

    def status(self) -> Dict[str, Any]:
        snapshot = self.snapshot
        rows = snapshot["session_rows"]
        with self.lock:
            sessions = [self._session_row(row) for row in rows]
            self._forget_ended(rows)
        warnings = [{"time": None, "level": "WORKER", "message": line} for row in rows for line in row["warnings"]]
        return {"server": self._server_facts(snapshot), "sessions": sessions,
                "log": list(self.recent_log.records) + warnings[-RECENT_LOG_LINES:]}

    def thumbnails(self) -> Dict[str, Optional[str]]:
        rows = self.snapshot["session_rows"]
        with self.lock:
            return {row["session_id"]: self._view(row).thumbnail_url for row in rows}

    def _view(self, row: Dict[str, Any]) -> SessionView:
        view = self.views.setdefault(row["session_id"], SessionView())
        view.refresh(row, self.decode)
        return view

    def _forget_ended(self, rows: List[Dict[str, Any]]) -> None:
        alive = {row["session_id"] for row in rows}
        for session_id in [known for known in self.views if known not in alive]:
            del self.views[session_id]

    @staticmethod
    def _server_facts(snapshot: Dict[str, Any]) -> Dict[str, Any]:
        facts = {key: value for key, value in snapshot.items() if key not in ("simulators", "session_rows")}
        facts["simulators"] = {name: {"backend_version": sim["info"].get("backend_version"),
                                      "simulator_stack": sim["info"].get("simulator_stack"),
                                      "renderer": renderer_name(sim["info"].get("renderer") or {}),
                                      "problem": sim["problem"]}
                               for name, sim in snapshot["simulators"].items()}
        return facts

    def _session_row(self, row: Dict[str, Any]) -> Dict[str, Any]:
        summary = self._view(row).summary
        step = summary.get("step")  # the simulator's own count when it reports one
        return {
            "session_id": row["session_id"], "peer": row["peer"], "simulator": row["simulator"],
            "task": row["task"], "episode": row["episodes"], "step": row["episode_steps"] if step is None else step,
            "reward": summary.get("reward"), "success": summary.get("success"), "busy": row["busy"],
            "idle_s": row["idle_s"], "worker_pid": row["worker_pid"],
            "worker_rss_mb": process_rss_mb(row["worker_pid"]), "crash": row["crash"],
        }


class DashboardAccess:
    """Who may read and act: the Host names this machine, and the token where it is needed."""

    def __init__(self, bind_host: str, host_names: Tuple[str, ...], token: str) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.loopback_only = bind_host in LOOPBACK_NAMES
        own = () if bind_host in ("", "0.0.0.0", "::") else (bind_host.lower(),)
        self.host_names = set(LOOPBACK_NAMES + own + tuple(host_names))

    def host_allowed(self, host_header: Optional[str]) -> bool:
        """Whether the Host header names this machine (any port)."""
        host = (host_header or "").strip().lower()
        if host.startswith("["):  # [::1]:8080
            host = host[1:host.find("]")] if "]" in host else ""
        elif host.count(":") == 1:
            host = host.rpartition(":")[0]
        return bool(host) and host in self.host_names

    def matches(self, given: Optional[str]) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def may_read(self, query_token: Optional[str], cookie_token: Optional[str]) -> bool:
        return self.loopback_only or self.matches(query_token) or self.matches(cookie_token)


class DashboardHandler(BaseHTTPRequestHandler):
    """GET reads, POST acts (with the token); http.server answers every other method 501."""

    server_version = "sim-dashboard"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = urlsplit(self.path)
        query_token = parse_qs(route.query).get("token", [None])[0]
        if not self._host_checked():
            return
        if route.path in ACTIONS:
            self._send_json({"error": f"{route.path} changes the server: POST it with the {TOKEN_HEADER} header"},
                            405, {"Allow": "POST"})
        elif not self.server.access.may_read(query_token, self._cookie_token()):
            self._send_json({"error": "this dashboard listens beyond loopback: open the URL with ?token=... that "
                                      "the server logged"}, 403)
        elif route.path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.encode(), self._remembered(query_token))
        elif route.path == "/api/status":
            self._send_json(self.server.state.status())
        elif route.path == "/api/thumbnails":
            self._send_json(self.server.state.thumbnails())
        elif route.path in ("/tasks", "/api/tasks/choices") and self._task_form() is not None:
            if route.path == "/tasks":
                self._send(200, "text/html; charset=utf-8", TASK_PAGE.encode(), self._remembered(query_token))
            else:
                self._send_json(self.server.task_form.choices())
        else:
            self._send_json({"error": f"no page {route.path}"}, 404)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        route = urlsplit(self.path)
        if not self._host_checked():
            return
        if route.path not in ACTIONS:
            self._send_json({"error": f"{route.path} takes no POST"}, 405, {"Allow": "GET"})
            return
        if not self.server.access.matches(self.headers.get(TOKEN_HEADER)):
            self._send_json({"error": f"an action needs the dashboard's token in the {TOKEN_HEADER} header "
                                      "(the server logs the URL that carries it)"}, 403)
            return
        body = self._json_body()
        if body is None:
            return
        if route.path == "/api/end":
            self._end_session(body.get("session"))
        elif self._task_form() is not None:
            action = {"/api/tasks/check": self.server.task_form.check, "/api/tasks/save": self.server.task_form.save,
                      "/api/tasks/preview": self.server.task_form.preview}[route.path]
            status, reply = action(body)
            self._send_json(reply, status)

    def _task_form(self):
        """The task builder, or None after a 404 saying what turns it on."""
        if self.server.task_form is None:
            self._send_json({"error": "the task builder needs a server started with --dashboard-admin and "
                                      "--task-dir DIR (serving libero)"}, 404)
        return self.server.task_form

    def _remembered(self, query_token: Optional[str]) -> Dict[str, str]:
        """A page opened with the right ?token= keeps it in a cookie for its actions."""
        if not self.server.access.matches(query_token):
            return {}
        return {"Set-Cookie": f"{TOKEN_COOKIE}={query_token}; Path=/; SameSite=Strict"}

    def _host_checked(self) -> bool:
        if self.server.access.host_allowed(self.headers.get("Host")):
            return True
        self._send_json({"error": "the Host header does not name this machine (sim_server.py --dashboard-hosts "
                                  "adds names)"}, 403)
        return False

    def _cookie_token(self) -> Optional[str]:
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(TOKEN_COOKIE)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def _json_body(self) -> Optional[Dict[str, Any]]:
        """The POST's JSON object, or None once a 400 or 413 was sent."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_POST_BYTES:
            self._send_json({"error": f"a body of 0 to {MAX_POST_BYTES} bytes, with its Content-Length"}, 413)
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json({"error": "the body must be a JSON object"}, 400)
            return None
        return body

    def _end_session(self, session_id: Any) -> None:
        if not self.server.admin:
            self._send_json({"error": "ending sessions needs a server started with --dashboard-admin"}, 403)
            return
        if not isinstance(session_id, str):
            self._send_json({"error": 'the body must be {"session": "SESSION_ID"}'}, 400)
            return
        self.server.end_requests.put(session_id)
        self._send_json({"ending": session_id})

    def _send_json(self, payload: Any, code: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(code, "application/json", json.dumps(payload).encode(), headers)

    def _send(self, code: int, content_type: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def parse_request(self) -> bool:
        if not super().parse_request():  # http.server's own limits: 64 KiB a line, 100 headers
            return False
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(414)
            return False
        return True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # page polls would drown the server's log


class DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], state: DashboardState, admin: bool, access: DashboardAccess,
                 task_form: Optional[TaskForm]) -> None:
        super().__init__(address, DashboardHandler)
        self.state = state
        self.admin = admin
        self.access = access
        self.task_form = task_form if admin else None
        self.end_requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: a flood of connections gets closed, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Dashboard:
    """The dashboard as the loop sees it: an observer fed from the loop thread, serving from its own.

    The loop calls replied() for each simulator reply it forwards and publish() once a tick, which
    copies what pages show into a snapshot of plain values; the HTTP threads read only the latest
    snapshot, never the loop's objects. Admin actions go back through
    take_end_requests().
    """

    def __init__(self, host: str, port: int, admin: bool, decode: Callable[[bytes], Dict[str, Any]],
                 host_names: Tuple[str, ...] = (), token: str = "", task_form: Optional[TaskForm] = None) -> None:
        self.activity: Dict[str, SessionActivity] = {}  # the loop thread's alone
        self.recent_log = RecentLog()
        self.state = DashboardState(decode, self.recent_log)
        self.access = DashboardAccess(host, host_names, token)
        self.http = DashboardHTTPServer((host, port), self.state, admin, self.access, task_form)
        logging.getLogger().addHandler(self.recent_log)
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="dashboard", daemon=True)
        self.thread.start()
        if host not in LOOPBACK_NAMES:
            log.warning("the dashboard listens on %s:%d, beyond loopback: pages and actions need its token, and "
                        "plain HTTP carries it unencrypted", host, port)
        log.info("dashboard on %s?token=%s", self.url, self.access.token)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def replied(self, session_id: str, method: str, body: bytes, ok: bool) -> None:
        """A simulator reply went to a session's client (loop thread)."""
        self.activity.setdefault(session_id, SessionActivity()).note(method, body, ok)

    def publish(self, facts: Dict[str, Any]) -> None:
        """The server's facts, plain values made by the loop (SimulatorServer.facts()), with what this
        dashboard saw of each session's replies, become what pages see (loop thread)."""
        rows = [self._session_row(session) for session in facts["sessions"]]
        alive = {row["session_id"] for row in rows}
        self.activity = {key: value for key, value in self.activity.items() if key in alive}
        self.state.snapshot = {**facts, "sessions": len(rows), "session_rows": rows,  # one assignment: readers
                               "task_builder": self.http.task_form is not None}  # see the old one or the new

    def _session_row(self, session: Dict[str, Any]) -> Dict[str, Any]:
        activity = self.activity.get(session["session_id"], SessionActivity())
        lines = session.pop("stderr_lines")
        return {**session, "episodes": activity.episodes, "episode_steps": activity.episode_steps,
                "frame_body": activity.frame_body, "task_body": activity.task_body,
                "warnings": [line.rstrip() for line in lines if " WARNING " in line or " ERROR " in line
                             or "Traceback" in line]}

    def take_end_requests(self) -> List[str]:
        """Session ids the admin asked to end since the last call (loop thread)."""
        ids = []
        while not self.http.end_requests.empty():
            ids.append(self.http.end_requests.get_nowait())
        return ids

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        logging.getLogger().removeHandler(self.recent_log)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Simulator Inference Center</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f6f7f9; }
h1 { font-size: 1.3em; margin: 0 0 .6em; } h2 { font-size: 1.05em; margin: 1.4em 0 .5em; }
.facts { display: flex; flex-wrap: wrap; gap: .6em; }
.fact { background: #fff; border: 1px solid #d8dce3; border-radius: 6px; padding: .5em .8em; }
.fact b { display: block; font-size: 1.2em; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border-bottom: 1px solid #e3e6eb; padding: .35em .6em; text-align: left; vertical-align: middle; }
th { background: #eef0f4; font-weight: 600; }
img.thumb { width: 96px; height: 96px; object-fit: contain; background: #222; border-radius: 4px; }
.ok { color: #147a3d; font-weight: 600; } .bad { color: #a3261f; }
.log { font: 12px ui-monospace, monospace; background: #fff; border: 1px solid #d8dce3; padding: .5em;
       max-height: 14em; overflow: auto; white-space: pre-wrap; }
.muted { color: #6b7280; }
</style></head>
<body>
<h1>Simulator Inference Center</h1>
<div id="server" class="facts"><span class="muted">loading...</span></div>
<p id="builder" hidden><a href="/tasks">New custom task</a> (task builder)</p>
<h2>Sessions</h2>
<table><thead><tr><th>camera</th><th>session</th><th>peer</th><th>simulator</th><th>task</th><th>episode</th>
<th>step</th><th>reward</th><th>success</th><th>idle s</th><th>worker</th><th>RSS MB</th><th></th></tr></thead>
<tbody id="sessions"></tbody></table>
<h2>Recent warnings and errors</h2>
<div id="log" class="log"></div>
<p class="muted" id="updated"></p>
<script>
"use strict";
let thumbnails = {};
function token() {  // the dashboard's token, kept in a cookie when the page was opened with ?token=
  const found = document.cookie.split("; ").find(c => c.startsWith("sim_dashboard_token="));
  return found ? decodeURIComponent(found.split("=")[1]) : null;
}
function act(path, body) {  // every action is a POST with the token in a header
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json", "X-Sim-Token": token()},
                      body: JSON.stringify(body)});
}
function text(value) { return value === null || value === undefined ? "" : String(value); }
function cell(row, value, cls) {
  const td = row.insertCell(); td.textContent = text(value); if (cls) td.className = cls; return td;
}
function fact(box, label, value) {
  const div = document.createElement("div"); div.className = "fact";
  const b = document.createElement("b"); b.textContent = text(value);
  div.appendChild(b); div.appendChild(document.createTextNode(label)); box.appendChild(div);
}
function showServer(server) {
  const box = document.getElementById("server"); box.replaceChildren();
  for (const [name, sim] of Object.entries(server.simulators)) {
    const stack = Object.entries(sim.simulator_stack || {}).map(([k, v]) => k + " " + v).join(", ");
    fact(box, stack + (sim.renderer ? "; " + sim.renderer : "") + (sim.problem ? "; " + sim.problem : ""), name);
  }
  fact(box, "uptime", Math.round(server.uptime_s) + " s");
  fact(box, "sessions in use / max", server.simulator_sessions + " / " + server.max_sessions);
  fact(box, "requests per second", server.requests_per_s);
  fact(box, "CURVE", server.curve ? "on" : "off");
  document.getElementById("builder").hidden = !server.task_builder;
}
function showSessions(status) {
  const body = document.getElementById("sessions"); body.replaceChildren();
  if (status.sessions.length === 0) {
    const row = body.insertRow(); const td = cell(row, "no sessions", "muted"); td.colSpan = 13; return;
  }
  for (const s of status.sessions) {
    const row = body.insertRow(); row.className = "session";
    const camera = row.insertCell();
    if (thumbnails[s.session_id]) {
      const img = document.createElement("img"); img.className = "thumb"; img.alt = "camera of " + s.session_id;
      img.src = thumbnails[s.session_id]; camera.appendChild(img);
    }
    cell(row, s.session_id.slice(0, 8)); cell(row, s.peer); cell(row, s.simulator);
    cell(row, s.task, "task"); cell(row, s.episode); cell(row, s.step, "step");
    cell(row, typeof s.reward === "number" ? s.reward.toFixed(3) : s.reward);
    cell(row, s.success === null || s.success === undefined ? "" : (s.success ? "yes" : "no"), s.success ? "ok" : "");
    cell(row, s.idle_s); cell(row, s.worker_pid); cell(row, s.worker_rss_mb);
    const action = row.insertCell();
    if (status.server.admin && token()) {
      const button = document.createElement("button"); button.textContent = "end";
      button.onclick = () => act("/api/end", {session: s.session_id});
      action.appendChild(button);
    } else if (status.server.admin) {
      action.textContent = "open the logged URL with its token to end sessions"; action.className = "muted";
    }
  }
}
function showLog(lines) {
  const box = document.getElementById("log");
  box.textContent = lines.length ? lines.map(l => l.level + " " + l.message).join("\\n") : "none";
}
async function refresh() {
  try {
    const [status, thumbs] = await Promise.all([fetch("/api/status").then(r => r.json()),
                                                fetch("/api/thumbnails").then(r => r.json())]);
    thumbnails = thumbs;
    showServer(status.server); showSessions(status); showLog(status.log);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("updated").textContent = "server not answering: " + error;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""
