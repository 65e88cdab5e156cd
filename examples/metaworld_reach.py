"""A Meta-World reach controller in a few lines: the hand moves straight at the goal.

    python sim_eval.py --address tcp://localhost:5555 --simulator metaworld --tasks metaworld/reach-v3 \
        --policy examples.metaworld_reach:act --episodes 50

Meta-World's 39-D state (its `standard` convention) holds the hand's position in [0:3] and the
goal's in [36:39]. The action is a proportional step toward the goal, clipped into the action
space [-1, 1]; the gripper (the fourth value) stays at 0.

`act_chunk` plans CHUNK actions from one observation, predicting where the hand will be (Meta-World
moves its mocap target by action * 1/100 m a step): a chunk policy for real-time runs,

    python sim_eval.py --address tcp://localhost:5555 --simulator metaworld --tasks metaworld/reach-v3 \
        --policy examples.metaworld_reach:act_chunk --replan-steps 5 --latency 0,2,4 --episodes 50
"""

import numpy as np

CONVENTION = "standard"  # Meta-World's own observation: the 39-D state
EXPECTS = {"state": {"shape": [39], "dtype": "float64"}}
GAIN = 10.0  # Meta-World's own scripted reach policy moves the hand with this gain
CHUNK = 10  # actions per planned chunk
ACTION_SCALE = 1.0 / 100  # metres the mocap target moves per unit of action (SawyerXYZEnv.action_scale)


def act(observation, task_info):
    """One action: (goal - hand) * GAIN, clipped, gripper 0."""
    state = observation["state"]
    move = np.clip((state[36:39] - state[:3]) * GAIN, -1.0, 1.0)
    return np.append(move, 0.0).astype(np.float32)


def act_chunk(observation, task_info):
    """CHUNK actions [CHUNK, 4]: act()'s rule applied to the hand position each action would lead to."""
    state = observation["state"]
    hand, goal = state[:3].astype(np.float64), state[36:39]
    chunk = []
    for _ in range(CHUNK):
        move = np.clip((goal - hand) * GAIN, -1.0, 1.0)
        chunk.append(np.append(move, 0.0))
        hand = hand + move * ACTION_SCALE
    return np.asarray(chunk, dtype=np.float32)
