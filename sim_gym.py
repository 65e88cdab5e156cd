"""Gymnasium environments over simulator sessions: copy next to sim_client.py (needs gymnasium).

    from sim_gym import SimEnv, SimVectorEnv

    env = SimEnv("tcp://sim:5555", "libero_spatial/pick_up_the_black_bowl_...")
    observation, info = env.reset(seed=7, options={"init_state_index": 3})
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["is_success"], env.render()          # the latest camera frame, upright
    env.close()                               # ends the session and its simulator

    envs = SimVectorEnv(["tcp://sim-a:5555", "tcp://sim-b:5555"], task, num_envs=8)

Spaces come from the task's specs: an action spec with bounds is a Box (LIBERO's
Box(-1, 1, (7,))), the observation a Dict of one Box per key. The vector env steps its
sessions concurrently and never resets one by itself: an episode that ended stays ended
until you reset it (reset(options={"reset_mask": ...})), so init-state coverage is yours.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from sim_client import SimulatorClient, upright


def space_from_spec(spec: Dict[str, Any]) -> spaces.Space:
    """The Box (MultiBinary for bools) a protocol spec {"shape", "dtype", "low"?, "high"?} describes."""
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    if dtype.kind == "b":
        return spaces.MultiBinary(shape)
    if "low" in spec and "high" in spec:
        return spaces.Box(np.asarray(spec["low"], dtype=dtype), np.asarray(spec["high"], dtype=dtype), shape, dtype)
    if dtype == np.uint8:
        return spaces.Box(0, 255, shape, dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return spaces.Box(info.min, info.max, shape, dtype)
    return spaces.Box(-np.inf, np.inf, shape, dtype)


class SimEnv(gymnasium.Env):
    """One simulator session as a gymnasium.Env: load_task at construction, close() ends the session.

    reset(seed=..., options={"init_state_index": i}) starts from LIBERO's fixed init state i; with a
    seed and no index it uses seed % num_init_states, so the same seed gives the same episode.
    step() returns the 5-tuple with info["is_success"]; render() the latest camera frame, upright.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, address: str, task: str, load_options: Optional[Dict[str, Any]] = None,
                 render_camera: Optional[str] = None, **client_options: Any) -> None:
        self.sim = SimulatorClient(address, **client_options)
        self.task_info = self.sim.load_task(task, **(load_options or {}))
        action_spec = self.task_info["action_spec"]
        self.action_space = (space_from_spec(action_spec["action"]) if list(action_spec) == ["action"] else
                             spaces.Dict({name: space_from_spec(spec) for name, spec in action_spec.items()}))
        self.observation_space = spaces.Dict({name: space_from_spec(spec)
                                              for name, spec in self.task_info["observation_spec"].items()})
        images = [name for name, spec in self.task_info["observation_spec"].items() if len(spec["shape"]) == 3]
        self.render_camera = render_camera or (images[0] if images else None)
        self.render_mode = "rgb_array"
        self._observation: Optional[Dict[str, np.ndarray]] = None

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None
              ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        super().reset(seed=seed)
        init_state_index = (options or {}).get("init_state_index")
        if init_state_index is None and seed is not None and "num_init_states" in self.task_info:
            init_state_index = seed % self.task_info["num_init_states"]
        observation, info = self.sim.reset(seed=seed, init_state_index=init_state_index)
        self._observation = observation
        return observation, dict(info)

    def step(self, action: Any) -> Tuple[Dict[str, np.ndarray], float, bool, bool, Dict[str, Any]]:
        result = self.sim.step(action)
        self._observation = result["observation"]
        info = dict(result["info"])
        info["is_success"] = bool(info.get("success", False))
        return result["observation"], float(result["reward"]), bool(result["terminated"]), \
            bool(result["truncated"]), info

    def render(self) -> Optional[np.ndarray]:
        if self._observation is None or self.render_camera is None:
            return None
        return np.ascontiguousarray(upright(self._observation[self.render_camera], self.task_info))

    def close(self) -> None:
        self.sim.disconnect()


class SimVectorEnv(VectorEnv):
    """N sessions stepped concurrently (one thread each), spread over one or more servers.

    Autoreset is off: a sub-environment whose episode ended is not reset until you reset it, by
    reset(options={"reset_mask": mask}) or a full reset(). options may carry "init_state_index": a
    list of N indices (None where you want the seed's default).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": ["rgb_array"]}

    def __init__(self, addresses: Union[str, Sequence[str]], task: str, num_envs: int,
                 load_options: Optional[Dict[str, Any]] = None, **client_options: Any) -> None:
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        self.num_envs = num_envs
        self.pool = ThreadPoolExecutor(max_workers=num_envs)
        self.envs: List[SimEnv] = self._on_every_env(
            lambda index: SimEnv(addresses[index % len(addresses)], task, load_options, **client_options))
        self.single_action_space = self.envs[0].action_space
        self.single_observation_space = self.envs[0].observation_space
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, num_envs)
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.render_mode = "rgb_array"
        self._observations: List[Optional[Dict[str, np.ndarray]]] = [None] * num_envs

    def _on_every_env(self, call: Callable[[int], Any]) -> List[Any]:
        """call(i) for every sub-environment at once; only after all have finished is the first
        error raised, so no call is still using a session when the caller goes on."""
        futures = [self.pool.submit(call, index) for index in range(self.num_envs)]
        wait(futures)
        return [future.result() for future in futures]

    def reset(self, *, seed: Union[int, Sequence[Optional[int]], None] = None,
              options: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        options = options or {}
        mask = np.asarray(options.get("reset_mask", np.ones(self.num_envs, dtype=bool)), dtype=bool)
        seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else seed + i
                                                              for i in range(self.num_envs)]
        indices = options.get("init_state_index", [None] * self.num_envs)

        def reset_one(i: int) -> Optional[Dict[str, Any]]:
            if not mask[i]:
                return None
            observation, info = self.envs[i].reset(seed=seeds[i], options={"init_state_index": indices[i]})
            self._observations[i] = observation
            return info

        infos = self._on_every_env(reset_one)
        return self._batched_observations(), {"infos": infos}

    def step(self, actions: Any) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
        per_env = list(gymnasium.vector.utils.iterate(self.action_space, actions))
        results = self._on_every_env(lambda i: self.envs[i].step(per_env[i]))
        for i, result in enumerate(results):
            self._observations[i] = result[0]
        rewards = np.array([r[1] for r in results], dtype=np.float64)
        terminated = np.array([r[2] for r in results], dtype=bool)
        truncated = np.array([r[3] for r in results], dtype=bool)
        return self._batched_observations(), rewards, terminated, truncated, {"infos": [r[4] for r in results]}

    def _batched_observations(self) -> Dict[str, np.ndarray]:
        first = next(o for o in self._observations if o is not None)
        return {key: np.stack([(o if o is not None else first)[key] for o in self._observations])
                for key in first}

    def render(self) -> List[Optional[np.ndarray]]:
        return [env.render() for env in self.envs]

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()
        self.pool.shutdown(wait=True)


def main(argv: Optional[List[str]] = None) -> int:
    """`python sim_gym.py --address ... --task ...`: one episode of random actions through SimEnv, to
    see the spaces a Gymnasium user gets."""
    from sim_client import DEFAULT_ADDRESS, OneLineParser

    parser = OneLineParser(prog="sim_gym.py", description="Gymnasium environments over simulator sessions "
                           "(import SimEnv or SimVectorEnv; run it to see one task's spaces and an episode of "
                           "random actions).")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    parser.add_argument("--task", required=True, help="a task name as list_tasks gives it")
    parser.add_argument("--steps", type=int, default=20, help="random actions to take at most")
    args = parser.parse_args(argv)
    env = SimEnv(args.address, args.task)
    try:
        print(f"action space: {env.action_space}\nobservation space: {env.observation_space}")
        env.reset(seed=0)
        steps, ended, reward, info = 0, False, 0.0, {"is_success": False}
        while steps < args.steps and not ended:
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            steps, ended = steps + 1, terminated or truncated
        print(f"{steps} random steps: last reward {reward:.3f}, is_success {info['is_success']}")
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
