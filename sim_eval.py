"""Evaluate a policy on simulator servers: whole suites, parallel sessions, openpi policy servers.

    python sim_eval.py --address tcp://sim-a:5555 --address tcp://sim-b:5555 --suite libero_spatial \\
        --episodes 50 --parallel 8 --policy my_policy:act --results spatial.json --videos videos/
    python sim_eval.py --address tcp://sim:5555 --suite libero_spatial --policy openpi://gpu-box:8000
    python sim_eval.py ... --policy my_policy:act_batch --batch-size 8     # one forward pass for 8 sessions

A policy is `module:function`, called `function(observation, task_info)` and returning an action
or an [K, A] chunk; with --batch-size B it is called with lists, `function(observations,
task_infos)`, and returns a list. A `reset(task_info)` function beside it (or a `.reset()` method
on a policy object) runs before every episode. `openpi://HOST:PORT` drives a policy served by
openpi's WebsocketPolicyServer, exactly as openpi's examples/libero/main.py does.

Needs sim_client.py beside it; websockets and Pillow only for openpi://.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import difflib
import html
import importlib
import importlib.util
import io
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack
import numpy as np

from sim_client import (
    CLIENT_VERSION,
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    BackendError,
    ServerBusy,
    ServerError,
    ServerTimeout,
    SimulatorClient,
    SimulatorClientError,
    upright,
    zero_action,
)

# A horizon for environments that set no episode limit.
MAX_UNLIMITED_STEPS = 10000
# An episode whose server died is retried elsewhere at most this often.
MAX_ATTEMPTS = 3
# The task_info fields that decide a score, kept in the results file beside the episodes.
TASK_PROVENANCE = ("convention", "max_episode_steps", "settle_steps", "seed", "flip_images", "state_vector",
                   "image_size", "simulator_stack", "renderer")
# A session told server_busy waits this long before its episode is tried again.
BUSY_BACKOFF_S = 1.0
# How long a run whose servers are all down waits for Ray to restart one (--ray).
RESTART_WAIT_S = 300.0
# How long a server may take to answer its first ping before the run stops with a clear line.
PREFLIGHT_TIMEOUT_S = 10.0
LOCAL_RAY = "local"  # --ray without an address
# openpi's LIBERO loop: replan every 5 actions, 224x224 images.
DEFAULT_REPLAN_STEPS = 5
OPENPI_IMAGE_SIZE = 224
DEFAULT_BATCH_WAIT_MS = 10.0


class EvalSetupError(Exception):
    """The run cannot start (bad policy, unknown task, no server); said in one line, exit 2."""


class PolicyError(Exception):
    """The policy failed on one observation; that episode fails and the run goes on."""


# --- policies ----------------------------------------------------------------

def zero_policy(observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """All zeros, whatever the observation: a baseline and a smoke test."""
    return zero_action(task_info)


def random_policy(observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Uniform within the action spec's bounds (or [-1, 1] where it has none)."""
    action = {}
    for name, spec in task_info["action_spec"].items():
        dtype = np.dtype(spec["dtype"])
        low = np.maximum(np.asarray(spec.get("low", -1.0), dtype=np.float64), -1.0)
        high = np.minimum(np.asarray(spec.get("high", 1.0), dtype=np.float64), 1.0)
        if dtype.kind in "iu":
            action[name] = np.asarray(np.random.randint(int(spec.get("low", 0)), int(spec.get("high", 1)) + 1),
                                      dtype=dtype)
        else:
            action[name] = np.random.uniform(low, high, spec["shape"]).astype(dtype)
    return action


BUILTIN_POLICIES = {"zero": zero_policy, "random": random_policy}


class Policy:
    """What an episode calls: `act(observation, task_info)` and `reset(task_info)`.

    Any exception from the user's code becomes a PolicyError carrying its traceback.
    `load_options` are load_task options the policy needs (openpi: its convention).
    """

    def __init__(self, act: Callable, reset: Optional[Callable] = None, name: str = "",
                 load_options: Optional[Dict[str, Any]] = None) -> None:
        self._act, self._reset = act, reset
        self.name = name
        self.load_options = load_options or {}

    def act(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Any:
        try:
            return self._act(observation, task_info)
        except PolicyError:
            raise
        except Exception:
            raise PolicyError(traceback.format_exc()) from None

    def reset(self, task_info: Dict[str, Any]) -> None:
        if self._reset is None:
            return
        try:
            self._reset(task_info)
        except Exception:
            raise PolicyError(traceback.format_exc()) from None

    def close(self) -> None:
        """Stop helper threads (the batcher); safe to call twice."""
        closer = getattr(self._act, "close", None)
        if closer is not None:
            closer()


def load_policy(spec: str, batch_size: int = 1, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                replan_steps: int = DEFAULT_REPLAN_STEPS) -> Policy:
    """A built-in policy, `module:name` importable from the current folder, or openpi://HOST:PORT."""
    if spec.startswith("openpi://"):
        return OpenpiPolicy(spec, replan_steps).as_policy()
    if spec in BUILTIN_POLICIES:
        if batch_size > 1:
            raise EvalSetupError(f"--batch-size needs a batched module:function policy, not {spec!r}")
        return Policy(BUILTIN_POLICIES[spec], name=spec)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise EvalSetupError(f"--policy {spec!r}: use zero, random, module:function or openpi://HOST:PORT")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise EvalSetupError(f"--policy {spec!r}: cannot import {module_name}: {type(error).__name__}: "
                             f"{error}") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise EvalSetupError(f"--policy {spec!r}: {module_name} has no callable {attribute!r}")
    reset = getattr(target, "reset", None)
    reset_hook = (lambda task_info: reset()) if callable(reset) else getattr(module, "reset", None)
    act = PolicyBatcher(target, batch_size, batch_wait_ms) if batch_size > 1 else target
    return Policy(act, reset_hook if callable(reset_hook) else None, name=spec)


# --- batching ----------------------------------------------------------------

@dataclass
class _BatchSlot:
    observation: Dict[str, np.ndarray]
    task_info: Dict[str, Any]
    done: threading.Event
    action: Any = None
    error: Optional[str] = None


class PolicyBatcher:
    """One call of a batched policy for the observations of many sessions.

    Each session's thread calls the batcher like a plain policy and waits; a serving thread
    takes the first waiting observation, gathers others for at most `wait_ms` (up to
    `batch_size`), calls `policy(observations, task_infos)` once and hands each its action.
    """

    def __init__(self, policy: Callable, batch_size: int, wait_ms: float) -> None:
        self.policy, self.batch_size, self.wait_s = policy, batch_size, wait_ms / 1000.0
        self.waiting: queue.Queue = queue.Queue()
        self.calls = 0
        self.thread = threading.Thread(target=self._serve, name="policy-batcher", daemon=True)
        self.thread.start()

    def __call__(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Any:
        slot = _BatchSlot(observation, task_info, threading.Event())
        self.waiting.put(slot)
        slot.done.wait()
        if slot.error is not None:
            raise PolicyError(slot.error)
        return slot.action

    def _gather(self, first: _BatchSlot) -> List[_BatchSlot]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                slot = self.waiting.get(timeout=max(remaining, 0.0)) if remaining > 0 else self.waiting.get_nowait()
            except queue.Empty:
                break
            if slot is None:
                self.waiting.put(None)  # keep the stop signal for _serve
                break
            batch.append(slot)
        return batch

    def _serve(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = self._gather(first)
            try:
                actions = list(self.policy([s.observation for s in batch], [s.task_info for s in batch]))
                if len(actions) != len(batch):
                    raise ValueError(f"a batched policy returned {len(actions)} actions for {len(batch)} observations")
            except Exception:
                error = traceback.format_exc()
                actions = [None] * len(batch)
                for slot in batch:
                    slot.error = error
            self.calls += 1
            for slot, action in zip(batch, actions):
                slot.action = action
                slot.done.set()

    def close(self) -> None:
        self.waiting.put(None)


# --- openpi policy servers ---------------------------------------------------

def resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """openpi's image_tools.resize_with_pad for one uint8 HxWx3 image: PIL bilinear to fit
    size x size, pasted centred on black. Pillow, so the pixels are openpi's own."""
    from PIL import Image

    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    ratio = max(width / size, height / size)
    resized_height, resized_width = int(height / ratio), int(width / ratio)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((resized_width, resized_height),
                                                                  resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (size, size), 0)
    canvas.paste(resized, (max(0, int((size - resized_width) / 2)), max(0, int((size - resized_height) / 2))))
    return np.asarray(canvas)


def openpi_observation(observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Dict[str, Any]:
    """The request openpi's examples/libero/main.py sends, from an observation under the openpi
    convention (images already rotated 180 degrees, its 8-D `state` computed by the server)."""
    return {
        "observation/image": resize_with_pad(observation["agentview_image"], OPENPI_IMAGE_SIZE),
        "observation/wrist_image": resize_with_pad(observation["robot0_eye_in_hand_image"], OPENPI_IMAGE_SIZE),
        "observation/state": observation["state"],
        "prompt": str(task_info.get("language") or task_info.get("description", "")),
    }


def _openpi_pack_array(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__} to an openpi server")


def _openpi_unpack_array(obj: Dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"openpi server sent an array of dtype {dtype}")
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def openpi_pack(message: Dict[str, Any]) -> bytes:
    """openpi-client's msgpack_numpy encoding: arrays as maps with bytes keys."""
    return msgpack.packb(message, default=_openpi_pack_array, use_bin_type=True)


def openpi_unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False, object_hook=_openpi_unpack_array)


class OpenpiPolicy:
    """A policy served by openpi's WebsocketPolicyServer: one websocket per session thread.

    Protocol (openpi's websocket_policy_server.py): after the handshake the server sends one
    msgpack frame of metadata; then each binary frame we send (an observation) is answered by
    one binary frame with "actions" of shape (H, 7). A text frame is a server-side traceback,
    followed by close code 1011. Each call returns the first `replan_steps` actions, which the
    runner executes as one chunk step, as openpi's loop replans every 5.
    """

    def __init__(self, url: str, replan_steps: int) -> None:
        host, _, port = url[len("openpi://"):].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise EvalSetupError(f"--policy {url!r}: write openpi://HOST:PORT")
        if replan_steps < 1:
            raise EvalSetupError("--replan-steps must be at least 1")
        try:
            import PIL  # noqa: F401
            from websockets.sync.client import connect  # noqa: F401
        except ImportError:
            raise EvalSetupError("openpi:// needs websockets and Pillow: pip install websockets pillow") from None
        self.uri, self.replan_steps = f"ws://{host}:{port}", replan_steps
        self.local = threading.local()
        self.metadata = self._connection_metadata()

    def _connect(self):
        from websockets.sync.client import connect

        connection = connect(self.uri, compression=None, max_size=None, open_timeout=PREFLIGHT_TIMEOUT_S)
        metadata = openpi_unpack(connection.recv(timeout=PREFLIGHT_TIMEOUT_S))
        return connection, metadata

    def _connection_metadata(self) -> Dict[str, Any]:
        """Connect once up front, so an unreachable policy server stops the run before it starts."""
        try:
            connection, metadata = self._connect()
        except Exception as error:
            raise EvalSetupError(f"no openpi policy server at {self.uri}: {type(error).__name__}: {error}") from None
        connection.close()
        return metadata if isinstance(metadata, dict) else {}

    def __call__(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> np.ndarray:
        if getattr(self.local, "connection", None) is None:
            self.local.connection, _ = self._connect()
        connection = self.local.connection
        connection.send(openpi_pack(openpi_observation(observation, task_info)))
        reply = connection.recv()
        if isinstance(reply, str):  # the server's traceback; it closes the connection next
            connection.close()
            self.local.connection = None
            raise PolicyError(f"openpi policy server failed:\n{reply}")
        actions = np.asarray(openpi_unpack(reply)["actions"])
        return actions[:self.replan_steps]

    def as_policy(self) -> Policy:
        return Policy(self, name=self.uri, load_options={"convention": "openpi"})


# --- episodes ----------------------------------------------------------------

def run_episode(sim: SimulatorClient, task_info: Dict[str, Any], policy: Policy, index: int,
                record_key: Optional[str] = None) -> Dict[str, Any]:
    """One episode by the standard protocol: init state `index` (or seed `index`), the task's horizon.

    A policy failure ends the episode as failed ("policy_error", with its traceback). `frames` are
    the `record_key` camera's images, upright.
    """
    started = time.monotonic()
    if "num_init_states" in task_info:
        observation, info = sim.reset(init_state_index=index % task_info["num_init_states"])
    else:
        observation, info = sim.reset(seed=index)
    frames = [upright(observation[record_key], task_info)] if record_key else []
    steps, success, failure, error, rewards = 0, False, None, None, []
    horizon = task_info.get("max_episode_steps") or MAX_UNLIMITED_STEPS
    try:
        policy.reset(task_info)
        while steps < horizon:
            result = sim.step(policy.act(observation, task_info))
            observation = result["observation"]
            rewards += result.get("rewards", [result["reward"]])
            steps = int(result["info"].get("step", steps + result.get("steps_run", 1)))
            if record_key:
                frames.append(upright(observation[record_key], task_info))
            if result["terminated"] or result["truncated"]:
                success = bool(result["info"].get("success", result["terminated"]))
                failure = None if success else ("horizon" if result["truncated"] else "terminated")
                break
        else:
            failure = "horizon"
    except PolicyError as policy_error:
        failure, error = "policy_error", str(policy_error)[-4000:]
    return {"init_state_index": index, "seed": info.get("seed", None if "num_init_states" in task_info else index),
            "success": success, "steps": steps, "failure": failure, "error": error,
            "sum_reward": float(sum(rewards)), "max_reward": float(max(rewards)) if rewards else 0.0,
            "seconds": round(time.monotonic() - started, 3), "frames": frames}


def end_session(sim: Optional[SimulatorClient]) -> None:
    """End a session on its server (its simulator is freed); nothing for None."""
    if sim is not None:
        sim.disconnect()


@dataclass
class Job:
    """One episode to run: a task, the init state (or seed) index, and the attempts made so far."""

    task: str
    index: int
    attempts: int = 0


class Evaluation:
    """Episodes of several tasks over K parallel sessions on one or more servers.

    Each finished episode is appended to the JSON results file at once, so a rerun with
    the same file skips what is done. An episode whose server times out or whose
    simulator dies is put back and retried on another session (another server when
    several are given); the report lists those retries.
    """

    def __init__(self, addresses: List[str], policy: Policy, tasks: List[str], episodes: int, parallel: int = 1,
                 results_path: Optional[str] = None, load_options: Optional[Dict[str, Any]] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, videos: Optional[VideoWriter] = None,
                 keep_thumbnails: bool = False, force: bool = False,
                 address_source: Optional[Callable[[], List[str]]] = None, **client_options: Optional[str]) -> None:
        """`address_source`, when given, is asked for the servers' addresses as the run goes (servers
        that Ray restarts come back on new ones); `addresses` are the first answer."""
        self.addresses, self.policy, self.tasks = list(addresses), policy, list(tasks)
        self.address_source = address_source
        self.parallel, self.results_path = max(1, parallel), results_path
        self.videos = videos
        self.keep_thumbnails = keep_thumbnails
        self.thumbnails: Dict[Tuple[str, int], List[str]] = {}  # (task, index) -> first and last frame, PNG base64
        self.load_options = {**policy.load_options, **(load_options or {})}
        self.timeout_s, self.client_options = timeout_s, client_options
        self.settings = {"policy": policy.name, "load_options": self.load_options}
        self.started_at, self.finished_at = utc_now(), None
        self.results = self._load_results(force)
        done = {(r["task"], r["init_state_index"]) for r in self.results}
        self.jobs = [Job(task, index) for task in self.tasks for index in range(episodes) if (task, index) not in done]
        self.total = len(self.jobs)
        self.retried: List[Dict[str, Any]] = []
        self.dead_addresses: set = set()
        self.servers: Dict[str, Dict[str, Any]] = {}  # address -> its get_info
        self.task_settings: Dict[str, Dict[str, Any]] = {}  # task -> its TASK_PROVENANCE fields
        self.lock = threading.Lock()
        self.progress = Progress(self.total)

    def _load_results(self, force: bool) -> List[Dict[str, Any]]:
        """The finished episodes of an earlier run with this results file (lost ones are run again)."""
        if not (self.results_path and os.path.exists(self.results_path)):
            return []
        with open(self.results_path) as results_file:
            earlier = json.load(results_file)
        settings = earlier.get("run", {}).get("settings")
        if settings is not None and settings != self.settings and not force:
            raise EvalSetupError(f"{self.results_path} was made with other settings ({json.dumps(settings)}, now "
                                 f"{json.dumps(self.settings)}): use another --results file, or --force to resume")
        return [r for r in earlier["episodes"] if r.get("failure") != "server_lost"]

    def run(self) -> List[Dict[str, Any]]:
        """Run every job on `parallel` threads, one session each; the finished episode records."""
        threads = [threading.Thread(target=self._work, args=(slot,), daemon=True) for slot in range(self.parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.progress.close()
        with self.lock:
            self.finished_at = utc_now()
            self._save()
        return self.results

    def run_info(self) -> Dict[str, Any]:
        """How this run was made: command, policy, settings, client version, times."""
        return {"command": sys.argv, "policy": self.policy.name, "settings": self.settings,
                "client_version": CLIENT_VERSION, "started_at": self.started_at, "finished_at": self.finished_at}

    def _next_job(self) -> Optional[Job]:
        with self.lock:
            return self.jobs.pop(0) if self.jobs else None

    def _live_addresses(self) -> List[str]:
        if self.address_source is not None:
            addresses = self.address_source()
            with self.lock:
                self.addresses = addresses
        with self.lock:
            return [a for a in self.addresses if a not in self.dead_addresses]

    def _address_for(self, slot: int) -> Optional[str]:
        live = self._live_addresses()
        deadline = time.monotonic() + RESTART_WAIT_S
        while not live and self.address_source is not None and time.monotonic() < deadline:
            time.sleep(1.0)  # a restarting server comes back on a new address
            live = self._live_addresses()
        return live[slot % len(live)] if live else None

    def _work(self, slot: int) -> None:
        """One session at a time on this slot's server; it ends (freeing its simulator) when the
        thread moves to another server and when the jobs run out."""
        sim, task, task_info = None, None, None
        try:
            while True:
                job = self._next_job()
                if job is None:
                    break
                address = self._address_for(slot)
                if address is None:
                    self._give_back(job, "every server is down")
                    break
                try:
                    if sim is None or sim.address != address:
                        end_session(sim)
                        sim, task = SimulatorClient(address, timeout_s=self.timeout_s, **self.client_options), None
                        self._note_server(address, sim)
                    if job.task != task:
                        task_info, task = sim.load_task(job.task, **self.load_options), job.task
                        with self.lock:
                            self.task_settings[task] = {key: task_info[key] for key in TASK_PROVENANCE
                                                        if key in task_info}
                    record = run_episode(sim, task_info, self.policy, job.index, self._record_key(task_info))
                except (ServerTimeout, BackendError, ServerBusy) as error:
                    if isinstance(error, ServerTimeout):
                        with self.lock:
                            self.dead_addresses.add(address)
                    else:  # the server is there: free the slot now
                        end_session(sim)
                    if isinstance(error, ServerBusy):
                        time.sleep(BUSY_BACKOFF_S)
                    sim, task = None, None
                    self._give_back(job, f"{type(error).__name__} on {address}: {error}")
                    continue
                except ServerError as error:  # the server refused an action or a reset: a failed episode
                    record = {"init_state_index": job.index, "success": False, "steps": 0, "seconds": 0.0,
                              "failure": "simulator_error", "error": f"{type(error).__name__}: {error}",
                              "frames": []}
                record.update(task=job.task, address=address, attempts=job.attempts + 1)
                self._finish(record)
        finally:
            end_session(sim)

    def _note_server(self, address: str, sim: SimulatorClient) -> None:
        if address not in self.servers:
            info = sim.get_info()
            for key in ("session_id", "current_task", "sim_pid", "active_sessions", "simulator_sessions"):
                info.pop(key, None)  # this session's, not the server's
            with self.lock:
                self.servers[address] = info

    def _give_back(self, job: Job, why: str) -> None:
        job.attempts += 1
        live = self._live_addresses() or self.address_source is not None  # a fleet's servers come back
        with self.lock:
            self.retried.append({"task": job.task, "init_state_index": job.index, "why": why[:200]})
            retry = job.attempts < MAX_ATTEMPTS and bool(live)
            if retry:
                self.jobs.append(job)
        if not retry:
            self.progress.note(f"gave up on {job.task} #{job.index}: {why[:120]}")
            self._finish({"task": job.task, "init_state_index": job.index, "seed": None, "success": False, "steps": 0,
                          "seconds": 0.0, "failure": "server_lost", "error": why[:2000], "attempts": job.attempts,
                          "frames": []})

    def _record_key(self, task_info: Dict[str, Any]) -> Optional[str]:
        if self.videos is None and not self.keep_thumbnails:
            return None
        images = [key for key, spec in task_info["observation_spec"].items() if len(spec["shape"]) == 3]
        wanted = self.videos.camera if self.videos is not None else None
        return wanted if wanted in images else (images[0] if images else None)

    def _finish(self, record: Dict[str, Any]) -> None:
        frames = record.pop("frames")
        if frames and self.keep_thumbnails:
            self.thumbnails[(record["task"], record["init_state_index"])] = [png_base64(frames[0]),
                                                                             png_base64(frames[-1])]
        if frames and self.videos is not None:
            record["video"] = self.videos.save(frames, record)
        if record.get("failure") == "policy_error":
            self.progress.note(f"policy failed in {record['task']} #{record['init_state_index']}: "
                               f"{record['error'].strip().splitlines()[-1]}")
        with self.lock:
            self.results.append(record)
            self._save()
            self.progress.update(record["success"])

    def _save(self) -> None:
        if not self.results_path:
            return
        temporary = self.results_path + ".tmp"
        with open(temporary, "w") as results_file:
            json.dump({"run": self.run_info(), "addresses": self.addresses, "servers": self.servers,
                       "tasks": self.tasks, "task_settings": self.task_settings, "summary": summary_json(self.results),
                       "retried": self.retried, "episodes": self.results}, results_file, indent=1)
        os.replace(temporary, self.results_path)


class Progress:
    """tqdm when it is installed, else one rewritten line on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.successes = total, 0, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="episode")
        except ImportError:
            self.bar = None

    def update(self, success: bool) -> None:
        """One more episode done."""
        self.done += 1
        self.successes += int(success)
        rate = self.successes / self.done
        if self.bar is not None:
            self.bar.set_postfix(success=f"{rate:.2f}")
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r{self.done}/{self.total} episodes, success {rate:.2f}")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        """A line of text that does not break the bar."""
        (self.bar.write if self.bar is not None else lambda t: print(t, file=sys.stderr))(text)

    def close(self) -> None:
        """End the bar or the progress line."""
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            sys.stderr.write("\n")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def png_base64(image: np.ndarray, longest_side: int = 160) -> str:
    """A small PNG of a camera frame, base64, for the report (Pillow)."""
    from PIL import Image

    step = max(1, math.ceil(max(image.shape[:2]) / longest_side))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[::step, ::step])).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VideoWriter:
    """One video per episode: MP4 when imageio-ffmpeg is installed, GIF otherwise.

    Files are named task__initNNN__outcome and never overwrite each other (a rerun adds __2, __3).
    `camera` picks the observation key; `failed_only` keeps only failed episodes.
    """

    def __init__(self, folder: str, camera: Optional[str] = None, failed_only: bool = False, fps: int = 20) -> None:
        self.folder, self.camera, self.failed_only, self.fps = folder, camera, failed_only, fps
        self.lock = threading.Lock()

    @staticmethod
    def extension() -> str:
        return ".mp4" if importlib.util.find_spec("imageio_ffmpeg") is not None else ".gif"

    def save(self, frames: List[np.ndarray], record: Dict[str, Any]) -> Optional[str]:
        if self.failed_only and record["success"]:
            return None
        try:
            import imageio
        except ImportError:
            print("hint: pip install imageio (and imageio-ffmpeg for MP4) to save videos", file=sys.stderr)
            return None
        outcome = "success" if record["success"] else (record.get("failure") or "failure")
        stem = f"{record['task'].replace('/', '__')}__init{record['init_state_index']:03d}__{outcome}"
        extension = self.extension()
        with self.lock:  # two threads must not pick the same free name
            os.makedirs(self.folder, exist_ok=True)
            path, copy = os.path.join(self.folder, stem + extension), 1
            while os.path.exists(path):
                copy += 1
                path = os.path.join(self.folder, f"{stem}__{copy}{extension}")
            open(path, "wb").close()
        if extension == ".mp4":
            imageio.mimsave(path, frames, fps=self.fps, macro_block_size=1)
        else:
            imageio.mimsave(path, frames, duration=1000 / self.fps, loop=0)
        return path


# --- summaries ---------------------------------------------------------------

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default): honest at 0% and 100% too."""
    if n == 0:
        return 0.0, 1.0
    rate = successes / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12))


def task_group(task: str) -> str:
    """The suite of "suite/task" names; other tasks form one group."""
    return task.rpartition("/")[0] or "tasks"


def summarize(results: List[Dict[str, Any]]) -> List[Tuple[str, int, float, float, float, float, float]]:
    """(name, episodes, success rate, 95% low, 95% high, mean steps, mean seconds) per task, then "overall"."""
    rows = []
    groups = sorted({r["task"] for r in results})
    for name, group in [(t, [r for r in results if r["task"] == t]) for t in groups] + [("overall", results)]:
        if group:
            successes = sum(bool(r["success"]) for r in group)
            low, high = wilson_interval(successes, len(group))
            rows.append((name, len(group), successes / len(group), low, high,
                         float(np.mean([r["steps"] for r in group])), float(np.mean([r["seconds"] for r in group]))))
    return rows


def summary_json(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per task and overall: episodes, successes, rate and its 95% Wilson interval."""
    return {row[0]: {"episodes": row[1], "successes": round(row[2] * row[1]), "success_rate": row[2],
                     "ci95": [row[3], row[4]], "mean_steps": row[5], "mean_seconds": row[6]}
            for row in summarize(results)}


def print_table(rows: List[Tuple[str, int, float, float, float, float, float]]) -> None:
    """summarize()'s rows as a text table on stdout."""
    width = max([len(row[0]) for row in rows] + [4])
    print(f"{'task':{width}s}  episodes  success  95% interval  mean steps  mean s")
    for name, count, rate, low, high, steps, seconds in rows:
        print(f"{name:{width}s}  {count:8d}  {rate:7.2f}  [{low:4.2f}, {high:4.2f}]  {steps:10.1f}  {seconds:6.2f}")


def save_chart(rows: List[Tuple[str, int, float, float, float, float, float]], path: str) -> None:
    """summarize()'s success rates with their 95% intervals as a PNG bar chart (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hint: pip install matplotlib to draw the success chart", file=sys.stderr)
        return
    names = [f"{row[0].split('/')[-1][:40]} (n={row[1]})" for row in rows]
    rates = np.array([row[2] for row in rows])
    errors = np.clip(np.array([[row[2] - row[3] for row in rows], [row[4] - row[2] for row in rows]]), 0, None)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    axes.barh(names, rates, xerr=errors, capsize=3, color=["#4c72b0"] * (len(rows) - 1) + ["#dd8452"])
    axes.set_xlim(0, 1)
    axes.invert_yaxis()
    axes.set_xlabel("success rate (bars: 95% Wilson interval)")
    figure.tight_layout()
    figure.savefig(path)


def lerobot_eval_info(results: List[Dict[str, Any]], tasks: List[str], eval_s: float) -> Dict[str, Any]:
    """The results in LeRobot's eval_info.json shape: per_episode, per_task, per_group, overall."""
    ordered = sorted(results, key=lambda r: (tasks.index(r["task"]) if r["task"] in tasks else len(tasks),
                                             r["init_state_index"]))

    def aggregate(group: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"avg_sum_reward": float(np.mean([r.get("sum_reward", 0.0) for r in group])) if group else 0.0,
                "avg_max_reward": float(np.mean([r.get("max_reward", 0.0) for r in group])) if group else 0.0,
                "pc_success": 100.0 * float(np.mean([r["success"] for r in group])) if group else 0.0,
                "n_episodes": len(group), "video_paths": [r["video"] for r in group if r.get("video")]}

    per_task = []
    for task_id, task in enumerate(tasks):
        group = [r for r in ordered if r["task"] == task]
        per_task.append({"task_group": task_group(task), "task_id": task_id, "task": task, "metrics": {
            "sum_rewards": [r.get("sum_reward", 0.0) for r in group],
            "max_rewards": [r.get("max_reward", 0.0) for r in group],
            "successes": [bool(r["success"]) for r in group], **aggregate(group)}})
    groups = sorted({task_group(task) for task in tasks})
    overall = aggregate(ordered)
    overall.update(eval_s=eval_s, eval_ep_s=eval_s / max(1, len(ordered)))
    return {
        "per_episode": [{"episode_ix": i, "sum_reward": r.get("sum_reward", 0.0),
                         "max_reward": r.get("max_reward", 0.0), "success": bool(r["success"]), "seed": r.get("seed"),
                         "task": r["task"], "init_state_index": r["init_state_index"]} for i, r in enumerate(ordered)],
        "per_task": per_task,
        "per_group": {name: aggregate([r for r in ordered if task_group(r["task"]) == name]) for name in groups},
        "overall": overall,
    }


# --- the HTML report ---------------------------------------------------------

REPORT_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #e3e6ec; text-align: left;
  vertical-align: top; }
.meta td:first-child { color: #5a6272; } code { font-size: 12px; }
.chart { display: grid; grid-template-columns: minmax(180px, 38%) 1fr 150px; gap: 6px 12px; align-items: center; }
.track { position: relative; height: 18px; background: #eef0f4; border-radius: 3px; }
.bar { position: absolute; left: 0; top: 0; bottom: 0; background: #4c72b0; border-radius: 3px; }
.bar.overall { background: #dd8452; }
.interval { position: absolute; top: 8px; height: 2px; background: #1d2330; }
.interval::before, .interval::after { content: ""; position: absolute; top: -5px; width: 2px; height: 12px;
  background: #1d2330; }
.interval::before { left: 0; } .interval::after { right: 0; }
.success { color: #1a7f37; font-weight: 600; } .failure { color: #b42318; font-weight: 600; }
img.frame, video { width: 128px; image-rendering: pixelated; margin-right: 4px; }
"""


def _cell(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value))


def _bars(rows: List[Tuple[str, int, float, float, float, float, float]]) -> str:
    lines = ['<div class="chart">']
    for name, count, rate, low, high, _, _ in rows:
        kind = "bar overall" if name == "overall" else "bar"
        lines.append(f'<div class="label">{html.escape(name)}</div><div class="track">'
                     f'<div class="{kind}" style="width:{100 * rate:.2f}%"></div>'
                     f'<div class="interval" style="left:{100 * low:.2f}%;width:{100 * (high - low):.2f}%"></div>'
                     f'</div><div>{100 * rate:.1f}% of {count} [{100 * low:.0f}, {100 * high:.0f}]</div>')
    lines.append("</div>")
    return "\n".join(lines)


def _media(record: Dict[str, Any], thumbnails: Dict[Tuple[str, int], List[str]]) -> str:
    video = record.get("video")
    if video and os.path.exists(video) and os.path.getsize(video) < 8 * 2**20:
        with open(video, "rb") as video_file:
            data = base64.b64encode(video_file.read()).decode("ascii")
        if video.endswith(".mp4"):
            return f'<video controls muted loop src="data:video/mp4;base64,{data}"></video>'
        return f'<img class="frame" alt="episode" src="data:image/gif;base64,{data}">'
    frames = thumbnails.get((record["task"], record["init_state_index"]))
    if frames:
        return "".join(f'<img class="frame" alt="{which} frame" src="data:image/png;base64,{frame}">'
                       for which, frame in zip(("first", "last"), frames))
    return "—"


def write_report(path: str, evaluation: Evaluation) -> None:
    """One self-contained HTML page: provenance, success bars with 95% intervals, every episode."""
    results = sorted(evaluation.results, key=lambda r: (r["task"], r["init_state_index"]))
    run = evaluation.run_info()
    meta = "".join(f"<tr><td>{html.escape(key)}</td><td><code>{_cell(value)}</code></td></tr>"
                   for key, value in run.items())
    servers = "".join(f"<tr><td>{html.escape(address)}</td><td><code>{_cell(info)}</code></td></tr>"
                      for address, info in evaluation.servers.items())
    settings = "".join(f"<tr><td>{html.escape(task)}</td><td><code>{_cell(values)}</code></td></tr>"
                       for task, values in sorted(evaluation.task_settings.items()))
    suites = summarize([{**r, "task": task_group(r["task"])} for r in results])
    episodes = []
    for record in results:
        outcome = "success" if record["success"] else (record.get("failure") or "failure")
        episodes.append(
            f'<tr class="episode"><td>{html.escape(record["task"])}</td><td>{record["init_state_index"]}</td>'
            f'<td>{_cell(record.get("seed"))}</td>'
            f'<td class="{"success" if record["success"] else "failure"}">{html.escape(outcome)}</td>'
            f'<td>{record["steps"]}</td><td>{record["seconds"]:.1f}</td><td>{_media(record, evaluation.thumbnails)}'
            f'</td></tr>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title><style>{REPORT_STYLE}</style></head>
<body>
<h1>Evaluation report: {html.escape(run["policy"])}</h1>
<table class="meta">{meta}</table>
<h2>Success by suite</h2>
{_bars(suites)}
<h2>Success by task</h2>
{_bars(summarize(results))}
<h2>Episodes ({len(results)})</h2>
<table class="episodes"><tr><th>task</th><th>init state</th><th>seed</th><th>outcome</th><th>steps</th>
<th>seconds</th><th>video or first and last frame</th></tr>
{"".join(episodes)}
</table>
<h2>Servers</h2>
<table class="meta">{servers}</table>
<h2>Task settings that decide the score</h2>
<table class="meta">{settings}</table>
</body></html>
"""
    with open(path, "w") as report_file:
        report_file.write(page)


# --- before any episode: servers, tasks ---------------------------------------

def check_servers(addresses: List[str], client_options: Dict[str, Optional[str]], timeout_s: float) -> None:
    """Every server answers a ping, or EvalSetupError naming the one that does not."""
    for address in addresses:
        sim = SimulatorClient(address, timeout_s=timeout_s, retries=0, **client_options)
        try:
            sim.ping()
        except ServerTimeout:
            raise EvalSetupError(f"no simulator server answers at {address} within {timeout_s:g} s: is it "
                                 "running, is the address right (tcp://HOST:PORT), are the CURVE keys right?") from None
        finally:
            sim.disconnect()


def resolve_tasks(address: str, tasks: Optional[List[str]], suite: Optional[str],
                  client_options: Dict[str, Optional[str]]) -> List[str]:
    """The tasks to run: the suite's, or `tasks` checked against what the server lists."""
    with SimulatorClient(address, timeout_s=PREFLIGHT_TIMEOUT_S, **client_options) as sim:
        try:
            if not tasks:
                return sim.list_tasks(suite=suite)
            listed: Dict[str, List[str]] = {}
            for task in tasks:
                group = task.rpartition("/")[0] or None
                if group not in listed:
                    listed[group] = sim.list_tasks(suite=group)
                if task not in listed[group]:
                    close = difflib.get_close_matches(task, listed[group], n=3) or listed[group][:3]
                    raise EvalSetupError(f"unknown task {task!r} on {address}; close matches: {close}")
        except ServerError as error:  # an unknown suite, or a server without suites
            raise EvalSetupError(str(error)) from None
    return tasks


# --- command line ------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    """The flags of sim_eval.py."""
    parser = argparse.ArgumentParser(prog="sim_eval.py", description="Evaluate a policy on simulator servers.")
    parser.add_argument("--address", action="append", help="server address; repeat to spread over servers")
    parser.add_argument("--policy", default="zero",
                        help="zero, random, module:function(observation, task_info), or openpi://HOST:PORT")
    parser.add_argument("--suite", default=None, help="evaluate this suite's tasks (LIBERO: libero_spatial, ...)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: the suite's, or all listed)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task (init states 0..N-1)")
    parser.add_argument("--parallel", type=int, default=1, help="episodes at once, one session each")
    parser.add_argument("--results", default="eval_results.json", help="JSON results; rerunning resumes it")
    parser.add_argument("--videos", default=None, help="folder for one video per episode (MP4 with imageio-ffmpeg)")
    parser.add_argument("--video-camera", default=None, help="observation key the videos show (default: first image)")
    parser.add_argument("--videos-failed-only", action="store_true", help="keep videos of failed episodes only")
    parser.add_argument("--chart", default=None, help="PNG bar chart of success rates with 95% intervals")
    parser.add_argument("--report", default=None, help="self-contained HTML report of the run")
    parser.add_argument("--lerobot-json", default=None, help="also write LeRobot's eval_info.json shape here")
    parser.add_argument("--force", action="store_true", help="resume a results file made with other settings")
    parser.add_argument("--load-option", action="append", default=[], metavar="KEY=JSON",
                        help="load_task option, e.g. camera_width=224 or flip_images=true")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="call the policy with lists of up to this many sessions' observations")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="how long a batch waits for stragglers")
    parser.add_argument("--replan-steps", type=int, default=DEFAULT_REPLAN_STEPS,
                        help="openpi://: actions of each returned chunk run before asking again")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    parser.add_argument("--simulator", default=None,
                        help="simulator to select on a server that serves several (see list_simulators)")
    parser.add_argument("--server-key", default=None, help="server's CURVE public key file (server.key)")
    parser.add_argument("--client-key", default=None, help="this client's CURVE secret key file (client.key_secret)")
    ray_flags = parser.add_argument_group("servers started by Ray (pip install -r requirements-ray.txt)")
    ray_flags.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                           help="start the servers as Ray actors on this cluster (auto, HOST:PORT of the head, "
                                "or nothing: a local Ray on loopback); replaces --address")
    ray_flags.add_argument("--servers", type=int, default=1, help="simulator servers to start")
    ray_flags.add_argument("--server-cpus", type=float, default=1.0, help="Ray CPUs each server takes")
    ray_flags.add_argument("--server-gpus", type=float, default=0.0,
                           help="Ray GPUs each server takes (its EGL device is the one Ray gives it)")
    ray_flags.add_argument("--server-args", default="", help='sim_server.py flags, e.g. "--simulator libero"')
    ray_flags.add_argument("--server-restarts", type=int, default=5, help="times Ray restarts a dead server")
    ray_flags.add_argument("--serve-only", action="store_true",
                           help="start the servers, print their addresses and keep them up until interrupted")
    ray_flags.add_argument("--addresses-file", default=None, help="write the servers' addresses here, one a line")
    return parser


def parse_load_options(options: List[str]) -> Dict[str, Any]:
    parsed = {}
    for option in options:
        key, equals, value = option.partition("=")
        try:
            parsed[key] = json.loads(value) if equals else None
        except ValueError:
            raise EvalSetupError(f"--load-option {option!r}: the value must be JSON, e.g. camera_width=224") from None
        if not equals:
            raise EvalSetupError(f"--load-option {option!r}: write KEY=JSON")
    return parsed


def run_with_ray(args: argparse.Namespace) -> int:
    """--ray: start the servers as Ray actors, run (or only serve) on them, then stop them all."""
    if args.servers < 1 or args.server_cpus <= 0 or args.server_gpus < 0 or args.server_restarts < 0:
        raise EvalSetupError("--servers must be at least 1, --server-cpus above 0, --server-gpus and "
                             "--server-restarts at least 0")
    if args.ray == LOCAL_RAY or args.ray.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        # Ray's single-machine switch, read when Ray is imported: without it Ray swaps 127.0.0.1 for
        # this machine's network address, where a loopback head does not listen.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import sim_ray
    except ImportError:
        raise EvalSetupError("--ray needs Ray: pip install -r requirements-ray.txt") from None
    fleet, started_ray = None, False
    try:
        started_ray = sim_ray.connect(None if args.ray == LOCAL_RAY else args.ray)
        fleet = sim_ray.ServerFleet(args.servers, args.server_cpus, args.server_gpus, args.server_args,
                                    args.server_restarts)
        write_addresses(args.addresses_file, fleet.addresses)
        if args.serve_only:
            return serve_until_interrupted(fleet, args.addresses_file)
        return run(args, address_source=lambda: fleet.addresses)
    except sim_ray.FleetError as error:
        raise EvalSetupError(str(error)) from None
    finally:
        if fleet is not None:
            print(f"stopping {args.servers} server(s); Ray restarted {fleet.restarts}", file=sys.stderr)
            fleet.stop()
        if started_ray:
            sim_ray.ray.shutdown()


def write_addresses(path: Optional[str], addresses: List[str]) -> None:
    if path:
        with open(path, "w") as addresses_file:
            addresses_file.write("".join(f"{address}\n" for address in addresses))


def serve_until_interrupted(fleet, addresses_file: Optional[str]) -> int:
    """Print the addresses (again whenever Ray restarts a server) until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    shown: List[str] = []
    try:
        while True:
            if fleet.addresses != shown:
                shown = fleet.addresses
                write_addresses(addresses_file, shown)
                print("serving: " + " ".join(shown), flush=True)
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def run(args: argparse.Namespace, address_source: Optional[Callable[[], List[str]]] = None) -> int:
    """Check the set-up, run, print the table, save what was asked; 0 when every episode ran.
    `address_source` (--ray) gives the servers' addresses as they change; else --address does."""
    client_options = {"server_key": args.server_key, "client_key": args.client_key, "simulator": args.simulator}
    addresses = address_source() if address_source is not None else args.address or [DEFAULT_ADDRESS]
    load_options = parse_load_options(args.load_option)
    if args.batch_size < 1 or args.parallel < 1 or args.episodes < 1:
        raise EvalSetupError("--batch-size, --parallel and --episodes must be at least 1")
    policy = load_policy(args.policy, args.batch_size, args.batch_wait_ms, args.replan_steps)
    check_servers(addresses, client_options, min(PREFLIGHT_TIMEOUT_S, args.timeout))
    tasks = resolve_tasks(addresses[0], args.tasks, args.suite, client_options)
    videos = VideoWriter(args.videos, args.video_camera, args.videos_failed_only) if args.videos else None
    started = time.monotonic()
    evaluation = Evaluation(addresses, policy, tasks, args.episodes, args.parallel, args.results, load_options,
                            args.timeout, videos=videos, keep_thumbnails=bool(args.report), force=args.force,
                            address_source=address_source, **client_options)
    try:
        results = evaluation.run()
    finally:
        policy.close()
    rows = summarize(results)
    print_table(rows)
    if evaluation.retried:
        print(f"retried {len(evaluation.retried)} episode attempt(s); see 'retried' in the results file")
    if args.chart:
        save_chart(rows, args.chart)
    if args.lerobot_json:
        with open(args.lerobot_json, "w") as lerobot_file:
            json.dump(lerobot_eval_info(results, tasks, time.monotonic() - started), lerobot_file, indent=1)
    if args.report:
        write_report(args.report, evaluation)
    lost = sum(r.get("failure") == "server_lost" for r in results)
    return 0 if len(results) == len(tasks) * args.episodes and not lost else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run_with_ray(args) if args.ray is not None else run(args)
    except EvalSetupError as error:
        print(f"sim_eval: {error}", file=sys.stderr)
        return 2
    except SimulatorClientError as error:
        print(f"sim_eval: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
