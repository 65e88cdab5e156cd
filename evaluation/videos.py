"""Episode videos (MP4 with imageio-ffmpeg, GIF otherwise) and small PNG frames for the report."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
import os
import sys
import threading
from typing import List, Optional

import numpy as np

from evaluation.records import EpisodeRecord


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

    def save(self, frames: List[np.ndarray], record: EpisodeRecord) -> Optional[str]:
        """Write the episode's video and return its path (None when it is not kept)."""
        if self.failed_only and record.success:
            return None
        try:
            import imageio
        except ImportError:
            print("hint: pip install imageio (and imageio-ffmpeg for MP4) to save videos", file=sys.stderr)
            return None
        outcome = "success" if record.success else (record.failure or "failure")
        stem = f"{record.task.replace('/', '__')}__init{record.init_state_index:03d}__{outcome}"
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
