"""A scripted pick-and-place for LIBERO-Object's tasks ("pick up the X and place it in the basket"),
from the simulator's object positions: no images, no learning. A reference arm for robustness
reports: it reads no camera, so a camera or lighting perturbation cannot move its score, while a
moved robot start or object layout can.

    python sim_eval.py --address tcp://localhost:5555 --simulator liberoplus --suite libero_plus/robot \\
        --policy examples.libero_object_scripted:act --paired-baseline --episodes 1

LIBERO's `standard` convention sends each object's position (`<object>_1_pos`), the basket's and
the gripper's (`robot0_eef_pos`). The arm hovers over the object, descends (to its centre, or
until the fingers rest on a tall one), closes the gripper, lifts, carries it over the basket and lets go; each action is a proportional step of the OSC_POSE
controller (one unit is 5 cm) toward the phase's target, clipped into [-1, 1].
"""

import re

import numpy as np

CONVENTION = "standard"
GAIN = 12.0  # action per metre of error: 1/0.05 m is one full controller step
HOVER = 0.12  # metres above the object, and above the basket when letting go
CARRY_HEIGHT = 0.30
CLOSE_STEPS = 12  # steps the gripper takes to close on the object
OPEN, CLOSE = -1.0, 1.0

STALL_STEPS = 4  # steps without descending a millimetre: the fingers rest on the object, close there

_phase = {"name": "hover", "closing": 0, "stalled": 0, "last_z": None}


def target_object(task_info) -> str:
    """The object key of "pick up the alphabet soup and place it in the basket ...": alphabet_soup_1."""
    match = re.search(r"pick up the (.+?) and place it in the basket", task_info["language"])
    if match is None:
        raise ValueError(f"not a LIBERO-Object task: {task_info['language']!r}")
    return match.group(1).replace(" ", "_") + "_1"


def reset(task_info):
    _phase.update(name="hover", closing=0, stalled=0, last_z=None)


def step_toward(hand, target, gripper):
    move = np.clip((np.asarray(target) - hand) * GAIN, -1.0, 1.0)
    return np.concatenate([move, np.zeros(3), [gripper]])


def act(observation, task_info):
    """One OSC_POSE action [7] for the current phase: hover, descend, close, lift, carry, release."""
    hand = observation["robot0_eef_pos"]
    thing = observation[f"{target_object(task_info)}_pos"]
    basket = observation["basket_1_pos"]
    phase = _phase["name"]
    if phase == "hover":
        target = thing + [0.0, 0.0, HOVER]
        if np.linalg.norm(target - hand) < 0.01:
            _phase["name"] = "descend"
        return step_toward(hand, target, OPEN)
    if phase == "descend":
        stalled = _phase["last_z"] is not None and _phase["last_z"] - hand[2] < 0.001
        _phase["stalled"], _phase["last_z"] = (_phase["stalled"] + 1 if stalled else 0), hand[2]
        if np.linalg.norm(thing - hand) < 0.008 or _phase["stalled"] >= STALL_STEPS:
            _phase["name"] = "close"
        return step_toward(hand, thing, OPEN)
    if phase == "close":
        _phase["closing"] += 1
        if _phase["closing"] >= CLOSE_STEPS:
            _phase["name"] = "lift"
        return step_toward(hand, hand, CLOSE)
    if phase == "lift":
        target = np.array([hand[0], hand[1], CARRY_HEIGHT])
        if abs(hand[2] - CARRY_HEIGHT) < 0.02:
            _phase["name"] = "carry"
        return step_toward(hand, target, CLOSE)
    target = np.array([basket[0], basket[1], max(basket[2] + HOVER, CARRY_HEIGHT if phase == "carry" else 0)])
    if phase == "carry" and np.linalg.norm(target[:2] - hand[:2]) < 0.01:
        _phase["name"] = "release"
    return step_toward(hand, target, OPEN if phase == "release" else CLOSE)
