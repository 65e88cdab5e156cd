"""sim_gym.py: Gymnasium environments over sessions, checked by Gymnasium's own env checker."""

from __future__ import annotations

import numpy as np
import pytest

import sim_client
from harness_sim import (
    libero_suite,
    wait_until,
)
from tests.shared import (
    LIBERO_SUITE,
    SMALL_CAMERA,
)

# --- sim_gym.py: gymnasium environments over sessions -------------------------

def test_sim_env_passes_gymnasiums_env_checker_on_the_mock(short_mock_server):
    from gymnasium.utils.env_checker import check_env

    import sim_gym

    env = sim_gym.SimEnv(short_mock_server.address, "reach_corner")
    try:
        check_env(env, skip_render_check=False)
        observation, info = env.reset(seed=3, options={"init_state_index": 4})
        assert env.observation_space.contains(observation) and info["step"] == 0
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(reward, float) and info["is_success"] is False and not terminated and not truncated
        assert env.render().shape == (16, 16, 3)
    finally:
        env.close()
    with sim_client.SimulatorClient(short_mock_server.address, timeout_s=30) as sim:
        assert wait_until(lambda: sim.get_info()["simulator_sessions"] == 0, 10)  # close() ended the session


def test_sim_vector_env_steps_sessions_together_and_never_resets_one_by_itself(short_mock_server):
    import sim_gym

    envs = sim_gym.SimVectorEnv(short_mock_server.address, "reach_center", num_envs=3)
    try:
        observations, _ = envs.reset(seed=0)
        assert observations["state"].shape == (3, 4)
        assert [int(s[3]) for s in observations["state"]] == [0, 0, 0]
        for _ in range(6):
            observations, rewards, terminated, truncated, infos = envs.step(np.zeros((3, 7)))
        assert truncated.all() and rewards.shape == (3,)
        with pytest.raises(sim_client.NotReset):  # no auto-reset: the ended episodes stay ended
            envs.step(np.zeros((3, 7)))
        observations, _ = envs.reset(options={"reset_mask": np.array([True, False, True])})
        assert [int(s[3]) for s in observations["state"]] == [0, 6, 0]
    finally:
        envs.close()


@pytest.mark.libero
def test_sim_env_passes_gymnasiums_env_checker_on_libero(libero_server):
    from gymnasium.utils.env_checker import check_env

    import sim_gym

    task = libero_suite(LIBERO_SUITE).get_task_names()[0]
    env = sim_gym.SimEnv(libero_server.address, task, load_options=SMALL_CAMERA)
    try:
        assert env.action_space.shape == (7,) and float(env.action_space.low[0]) == -1.0
        check_env(env)
        observation, _ = env.reset(options={"init_state_index": 2})
        assert np.array_equal(env.render(), observation["agentview_image"][::-1, ::-1])  # upright
    finally:
        env.close()
