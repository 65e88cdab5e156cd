"""The dashboard's task builder (with --dashboard-admin and --task-dir): write a custom LIBERO task
spec in the browser, checked against LIBERO's tables, previewed, and saved into the task folder.

The server process never imports LIBERO: specs are checked with backends/task_specs.py against
the tables the LIBERO catalog read at start, and a preview runs `sim_tasks.py preview` under
LIBERO's own interpreter, one at a time, bounded in time. Saving writes a new `NAME.json` into
the operator's folder and never overwrites a file. Only the dashboard's POSTs with its token
reach save and preview (server/dashboard.py checks that); clients of the protocol cannot.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
from typing import Any, Dict, Tuple

from backends.base import InvalidParams
from backends.task_specs import WORKSPACE_FIXTURES, TaskFolder, check_spec

PREVIEW_TIMEOUT_S = 300.0
PREVIEW_SIZE = 128
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TaskForm:
    """The form's data and actions over one task folder."""

    def __init__(self, folder: TaskFolder, interpreter: str) -> None:
        self.folder, self.interpreter = folder, interpreter
        self.preview_lock = threading.Lock()

    def choices(self) -> Dict[str, Any]:
        """LIBERO's names a spec may use, and the folder's tasks and problems."""
        registry = self.folder.registry
        entries, problems = self.folder.scan()
        return {"workspaces": list(WORKSPACE_FIXTURES), "objects": registry.objects,
                "affordances": registry.affordances, "predicates": registry.predicates,
                "tasks": sorted(entries), "problems": problems}

    def check(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """(HTTP status, reply) for a spec sent as {"spec": {...}}: checked, not saved."""
        try:
            spec = check_spec(self._spec_of(body), "", self.folder.registry)
        except InvalidParams as error:
            return 400, {"error": str(error)}
        return 200, {"ok": f"custom/{spec.name}: {spec.language}"}

    def save(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """Write the checked spec as NAME.json in the folder (never over an existing task)."""
        data = self._spec_of(body)
        try:
            spec = check_spec(data, "", self.folder.registry)
        except InvalidParams as error:
            return 400, {"error": str(error)}
        entries, _ = self.folder.scan()
        path = os.path.join(self.folder.folder, f"{spec.name}.json")
        taken = 409, {"error": f"custom/{spec.name} exists: pick another name (the form never overwrites)"}
        if spec.name in entries or os.path.exists(path):
            return taken
        data = {key: value for key, value in data.items() if key != "name"}
        with tempfile.NamedTemporaryFile("w", dir=self.folder.folder, suffix=".tmp", delete=False) as temporary:
            json.dump(data, temporary, indent=1)
        try:
            os.link(temporary.name, path)  # fails rather than replace a file made meanwhile
        except FileExistsError:
            return taken
        finally:
            os.unlink(temporary.name)
        return 200, {"saved": f"custom/{spec.name}", "file": os.path.basename(path)}

    def preview(self, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """Init states 0..3 of a saved task, rendered by LIBERO's interpreter, as a PNG data URL."""
        entries, _ = self.folder.scan()
        name = body.get("name")
        if name not in entries:
            return 404, {"error": f"no servable custom task {name!r}; tasks: {sorted(entries)}"}
        if not self.preview_lock.acquire(blocking=False):
            return 429, {"error": "a preview is being made: try again when it is done"}
        try:
            with tempfile.TemporaryDirectory(prefix="sim-preview-") as scratch:
                out = os.path.join(scratch, "preview.png")
                try:
                    result = subprocess.run([self.interpreter, os.path.join(HERE, "sim_tasks.py"), "preview",
                                             entries[name].path, "--out", out, "--size", str(PREVIEW_SIZE)],
                                            cwd=HERE, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                            timeout=PREVIEW_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    return 504, {"error": f"the preview took over {PREVIEW_TIMEOUT_S:.0f} s"}
                if result.returncode != 0 or not os.path.exists(out):
                    lines = result.stderr.strip().splitlines() or ["no output"]
                    return 400, {"error": lines[-1]}
                with open(out, "rb") as png:
                    return 200, {"image": "data:image/png;base64," + base64.b64encode(png.read()).decode()}
        finally:
            self.preview_lock.release()

    @staticmethod
    def _spec_of(body: Dict[str, Any]) -> Dict[str, Any]:
        spec = body.get("spec")
        return spec if isinstance(spec, dict) else {}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Task builder - Simulator Inference Center</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f6f7f9; max-width: 70em; }
h1 { font-size: 1.3em; } label { display: block; margin: .6em 0 .2em; font-weight: 600; }
input, select, textarea { font: 13px ui-monospace, monospace; width: 100%; box-sizing: border-box; }
textarea { height: 7em; } .row { display: flex; gap: 1em; } .row > div { flex: 1; }
.muted { color: #6b7280; } .bad { color: #a3261f; } .ok { color: #147a3d; }
button { margin: .8em .5em 0 0; padding: .4em 1em; } img { margin-top: 1em; max-width: 100%; }
</style></head><body>
<h1>New custom LIBERO task</h1>
<p class="muted">Saved into the server's task folder as NAME.json and served as custom/NAME
(docs/task_builder.md). Names come from LIBERO's own tables (lists below each field).</p>
<div class="row">
 <div><label for="name">name</label><input id="name" value="my_task"></div>
 <div><label for="workspace">workspace</label><select id="workspace"></select></div>
 <div><label for="horizon">horizon</label><input id="horizon" value="300"></div>
 <div><label for="init_states">init states</label><input id="init_states" value="10"></div>
</div>
<label for="language">instruction</label><input id="language" value="put the black bowl on the plate">
<div class="row">
 <div><label for="objects">objects (category: count, one a line)</label>
  <textarea id="objects">akita_black_bowl: 1
plate: 1</textarea><select id="object_choices" class="muted"></select></div>
 <div><label for="fixtures">fixtures (category: count)</label><textarea id="fixtures"></textarea></div>
</div>
<label for="regions">regions (name: x, y, half size; on the workspace, metres)</label>
<textarea id="regions">bowl_region: 0.0, -0.05, 0.04
plate_region: 0.0, 0.2, 0.04</textarea>
<div class="row">
 <div><label for="init">init (Predicate object place, one a line)</label>
  <textarea id="init">On akita_black_bowl_1 bowl_region
On plate_1 plate_region</textarea></div>
 <div><label for="goal">goal (Predicate object place, one a line)</label>
  <textarea id="goal">On akita_black_bowl_1 plate_1</textarea><span id="predicates" class="muted"></span></div>
</div>
<button id="check">Check</button><button id="save">Save</button><button id="preview">Preview</button>
<p id="message" class="muted"></p><img id="image" alt="">
<script>
"use strict";
function token() {
  const found = document.cookie.split("; ").find(c => c.startsWith("sim_dashboard_token="));
  return found ? decodeURIComponent(found.split("=")[1]) : null;
}
function lines(id) { return document.getElementById(id).value.split("\\n").map(l => l.trim()).filter(l => l); }
function counts(id) {
  const out = {};
  for (const line of lines(id)) { const [k, v] = line.split(":"); out[k.trim()] = parseInt(v, 10); }
  return out;
}
function spec() {
  const regions = {};
  for (const line of lines("regions")) {
    const [name, rest] = line.split(":"); const [x, y, half] = rest.split(",").map(Number);
    regions[name.trim()] = {center: [x, y], half_size: half};
  }
  return {name: document.getElementById("name").value.trim(), language: document.getElementById("language").value,
          workspace: document.getElementById("workspace").value, objects: counts("objects"),
          fixtures: counts("fixtures"), regions: regions,
          init: lines("init").map(l => l.split(/\\s+/)), goal: lines("goal").map(l => l.split(/\\s+/)),
          horizon: parseInt(document.getElementById("horizon").value, 10),
          init_states: parseInt(document.getElementById("init_states").value, 10)};
}
function say(text, cls) { const m = document.getElementById("message"); m.textContent = text; m.className = cls; }
async function act(path, body) {
  if (!token()) { say("open the dashboard URL the server logged (with its token) to save", "bad"); return null; }
  let reply;
  try {
    const response = await fetch(path, {method: "POST", body: JSON.stringify(body),
      headers: {"Content-Type": "application/json", "X-Sim-Token": token()}});
    reply = await response.json();
  } catch (error) { say("the server did not answer: " + error, "bad"); return null; }
  if (reply.error) { say(reply.error, "bad"); return null; }
  return reply;
}
document.getElementById("check").onclick = async () => {
  const reply = await act("/api/tasks/check", {spec: spec()}); if (reply) say("valid: " + reply.ok, "ok");
};
document.getElementById("save").onclick = async () => {
  const reply = await act("/api/tasks/save", {spec: spec()}); if (reply) say("saved: " + reply.saved, "ok");
};
document.getElementById("preview").onclick = async () => {
  say("rendering init states 0..3 (LIBERO builds the task first: up to a minute)...", "muted");
  const reply = await act("/api/tasks/preview", {name: spec().name});
  if (reply) { document.getElementById("image").src = reply.image; say("preview of custom/" + spec().name, "ok"); }
};
fetch("/api/tasks/choices").then(r => r.json()).then(choices => {
  function fill(id, names) {
    for (const name of names) {
      const o = document.createElement("option"); o.textContent = name; document.getElementById(id).appendChild(o);
    }
  }
  fill("workspace", choices.workspaces); fill("object_choices", choices.objects);
  document.getElementById("predicates").textContent = "predicates: " + choices.predicates.join(", ");
  document.body.dataset.ready = "yes";
});
</script></body></html>
"""
