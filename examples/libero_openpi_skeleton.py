"""A LIBERO policy skeleton in openpi's convention: what a VLA's wrapper looks like, with no weights.

    python sim_eval.py check --address tcp://localhost:5555 --suite libero_spatial \
        --policy examples.libero_openpi_skeleton:act
    python sim_eval.py --address tcp://localhost:5555 --suite libero_spatial --episodes 50 \
        --policy examples.libero_openpi_skeleton:act --results spatial.json

Declaring CONVENTION makes the server send what openpi's LIBERO loop feeds its models: both camera
images upright and an 8-D `state` (end-effector position, axis-angle, the two gripper joints).
Declaring EXPECTS makes `sim_eval.py` check, before the first episode, that the observations it gets
are exactly these; a run with another camera size or convention stops with every mismatch named.
Replace `infer` with your model; keep the rest.
"""

import numpy as np

CONVENTION = "openpi"
EXPECTS = {
    "agentview_image": {"shape": [256, 256, 3], "dtype": "uint8"},
    "robot0_eye_in_hand_image": {"shape": [256, 256, 3], "dtype": "uint8"},
    "state": {"shape": [8], "dtype": "float64"},
}
CHUNK = 5  # actions run per call, as openpi's LIBERO loop replans every 5
OPEN_GRIPPER = -1.0


def reset(task_info):
    """Before every episode: a model with memory clears it here."""


def infer(image, wrist_image, state, instruction):
    """Your model: images and state in, a [CHUNK, 7] chunk of delta end-effector actions out."""
    chunk = np.zeros((CHUNK, 7))
    chunk[:, 6] = OPEN_GRIPPER
    return chunk


def act(observation, task_info):
    """What sim_eval.py calls: one observation in, a [CHUNK, 7] action chunk out."""
    return infer(observation["agentview_image"], observation["robot0_eye_in_hand_image"], observation["state"],
                 task_info["language"])
