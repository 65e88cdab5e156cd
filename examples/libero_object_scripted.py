"""A scripted pick-and-place for LIBERO-Object's tasks ("pick up the X and place it in the basket"),
from the simulator's object positions: no images, no learning. A reference arm for robustness
reports: it reads no camera, so a camera or lighting perturbation cannot move its score, while a
moved robot start or object layout can.

    python sim_eval.py --address tcp://localhost:5555 --simulator liberoplus --episodes 1 \\
        --tasks libero_plus/robot/pick_up_the_milk_and_place_it_in_the_basket_view_0_0_100_0_0_initstate_78 \\
        --policy examples.libero_object_scripted:act --load-option 'cameras=[]' --paired-baseline

LIBERO's `standard` convention sends each object's position (`<object>_1_pos`), the basket's and
the gripper's (`robot0_eef_pos`, `robot0_gripper_qpos`). The arm goes over the object, descends (to
its centre, or until the fingers rest on a tall one), closes the gripper, lifts, carries it over
the basket and lets go; each action is a proportional step of the OSC_POSE controller (one unit is
5 cm) toward that target, clipped into [-1, 1]. Every action is decided from the observation alone:
a policy with per-episode state would need one per session, since `--parallel` sessions share it.
"""

import re

import numpy as np

CONVENTION = "standard"
GAIN = 12.0  # action per metre of error: 1/0.05 m is one full controller step
HOVER = 0.12  # metres above the object, and above the basket when letting go
CARRY_HEIGHT = 0.30
GRASP_HEIGHT = 0.01  # close when the gripper is this near the object's centre...
RESTING_HEIGHT = 0.04  # ...or this near and the arm has stopped: the fingers rest on a tall object
OPEN, CLOSE = -1.0, 1.0


def target_object(task_info) -> str:
    """The object key of "pick up the alphabet soup and place it in the basket ...": alphabet_soup_1."""
    match = re.search(r"pick up the (.+?) and place it in the basket", task_info["language"])
    if match is None:
        raise ValueError(f"not a LIBERO-Object task: {task_info['language']!r}")
    return match.group(1).replace(" ", "_") + "_1"


def step_toward(hand, target, gripper):
    move = np.clip((np.asarray(target) - hand) * GAIN, -1.0, 1.0)
    return np.concatenate([move, np.zeros(3), [gripper]])


def act(observation, task_info):
    """One OSC_POSE action [7], decided from this observation alone (so parallel sessions can share
    the function): carry what it holds to the basket and let go over it; else go over the object,
    descend, and close on it."""
    hand = observation["robot0_eef_pos"]
    thing = observation[f"{target_object(task_info)}_pos"]
    basket = observation["basket_1_pos"]
    finger = observation["robot0_gripper_qpos"][0]  # about 0.04 open, 0 closed on nothing
    settled = np.abs(observation["robot0_gripper_qvel"]).max() < 0.01
    holding = 0.002 < finger < 0.035 and settled and np.linalg.norm(thing - hand) < 0.05
    if holding:
        over_basket = np.linalg.norm(basket[:2] - hand[:2]) < 0.01
        if over_basket:
            return step_toward(hand, [basket[0], basket[1], basket[2] + HOVER], OPEN)
        if hand[2] < CARRY_HEIGHT - 0.02 and np.linalg.norm(basket[:2] - hand[:2]) > 0.05:
            return step_toward(hand, [hand[0], hand[1], CARRY_HEIGHT], CLOSE)  # lift before carrying
        return step_toward(hand, [basket[0], basket[1], CARRY_HEIGHT], CLOSE)
    if np.linalg.norm(thing[:2] - hand[:2]) > 0.01 and hand[2] > thing[2] + RESTING_HEIGHT:
        return step_toward(hand, thing + [0.0, 0.0, HOVER], OPEN)  # over the object first
    height = hand[2] - thing[2]
    stopped = np.linalg.norm(observation["robot0_joint_vel"]) < 0.05
    if height < GRASP_HEIGHT or (height < RESTING_HEIGHT and stopped) or finger < 0.035:
        return step_toward(hand, hand, CLOSE)  # at the object, or already closing on it
    return step_toward(hand, thing, OPEN)
