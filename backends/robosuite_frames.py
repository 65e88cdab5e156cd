"""Rendering only the frames someone looks at, for the robosuite-based simulators (robosuite, LIBERO).

robosuite renders every camera once per control step, when its observable samples (one of the
step's first physics substeps). Inside `frames.skipped(keep)`, a camera that is not kept returns a
black frame instead, and keeps a copy of MuJoCo's data from the moment it would have rendered.
`frames.render_skipped()` then renders the last step's skipped frames after all, from those copies:
the same pixels the camera would have given (the last step of an action chunk that ended the
episode early). Physics, rewards and success never read an image, so they do not change.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Collection, Dict, Iterator, Tuple

import numpy as np


class CameraFrames:
    """The camera observables of one robosuite env: skipped, deferred and rendered late."""

    def __init__(self, robosuite_env) -> None:
        self.env = robosuite_env
        self.deferred: Dict[str, Tuple[object, object]] = {}  # observable -> (its real sensor, data copy)
        self.copy = None  # the last copy of MuJoCo's data, and when and of what it was taken
        self.copy_time, self.copy_of = None, None

    def cameras(self) -> Dict[str, object]:
        return {name: observable for name, observable in self.env._observables.items() if name.endswith("_image")}

    @contextlib.contextmanager
    def skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        """Steps inside render only the cameras whose observation keys are in `keep`."""
        skipped = {name: observable for name, observable in self.cameras().items() if name not in keep}
        sensors = {name: observable._sensor for name, observable in skipped.items()}
        self.deferred = {}
        try:
            for name, observable in skipped.items():
                observable._sensor = self._deferring(name, observable)
            yield
        finally:
            for name, observable in skipped.items():
                observable._sensor = sensors[name]

    @contextlib.contextmanager
    def skipped_in_reset(self) -> Iterator[None]:
        """A reset inside renders no camera: a hard reset rebuilds the sensors, so they are skipped
        where the reset reads its observation, not before."""
        environment = self.env
        read = environment._get_observations

        def read_without_cameras(force_update: bool = False):
            with self.skipped():
                return read(force_update)

        environment._get_observations = read_without_cameras
        try:
            yield
        finally:
            del environment._get_observations  # the class's method again

    def _deferring(self, name: str, observable):
        sensor = observable._sensor
        blank = np.zeros(observable._data_shape, dtype=np.uint8)

        def deferring_sensor(_obs_cache):
            self.deferred[name] = (sensor, self._copy_of_now())
            return blank

        deferring_sensor.__modality__ = sensor.__modality__  # robosuite's sensor decorator marks this
        return deferring_sensor

    def _copy_of_now(self):
        """A copy of MuJoCo's data as it is now; the cameras that sample at one substep share it."""
        data = self.env.sim.data._data
        if self.copy is None or self.copy_time != data.time or self.copy_of is not data:
            self.copy, self.copy_time, self.copy_of = copy.copy(data), data.time, data
        return self.copy

    def render_skipped(self) -> Dict[str, np.ndarray]:
        """The frames the last skipped step did not render, rendered now from where they would have
        been (observation key -> image); the camera observables hold them too, as if rendered then."""
        if not self.deferred:
            return {}
        wrapper = self.env.sim.data  # the renderer reads wrapper._data when it renders
        now = wrapper._data
        frames = {}
        try:
            for name, (sensor, then) in self.deferred.items():
                wrapper._data = then
                frames[name] = np.array(sensor({}))
                self.env._observables[name]._current_observed_value = frames[name]
        finally:
            wrapper._data = now
            self.deferred = {}
        return frames
