"""Policies served by openpi's WebsocketPolicyServer, driven exactly as openpi's
examples/libero/main.py drives them: its observation keys, its image preprocessing, its
msgpack_numpy wire format, and a chunk of `replan_steps` actions per call.

Needs websockets and Pillow.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional

import msgpack
import numpy as np

from evaluation import PolicyError, PolicyTimeout, SetupError

# openpi's LIBERO loop: replan every 5 actions, 224x224 images.
DEFAULT_REPLAN_STEPS = 5
OPENPI_IMAGE_SIZE = 224
CONNECT_TIMEOUT_S = 10.0


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


# openpi-client's msgpack_numpy: another wire format than ours (bytes keys, numpy scalars kept).

def _pack_array(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__} to an openpi server")


def _unpack_array(obj: Dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"openpi server sent an array of dtype {dtype}")
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def openpi_pack(message: Dict[str, Any]) -> bytes:
    return msgpack.packb(message, default=_pack_array, use_bin_type=True)


def openpi_unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False, object_hook=_unpack_array)


class OpenpiPolicy:
    """A policy served by openpi's WebsocketPolicyServer: one websocket per session thread.

    Protocol (openpi's websocket_policy_server.py): after the handshake the server sends one
    msgpack frame of metadata; then each binary frame we send (an observation) is answered by
    one binary frame with "actions" of shape (H, 7). A text frame is a server-side traceback,
    followed by close code 1011. Each call returns the whole chunk; the runner executes its first
    `--replan-steps` actions as one chunk step, as openpi's loop replans every 5. With `send_prefix`
    a real-time run's request carries `prefix_actions`, the [D, 7] actions that run during the
    call's delay (realtime.py). A reply that does not
    come within `timeout_s` fails the episode with policy_timeout; that connection is dropped,
    so its late reply is never taken for the next observation's.
    """

    def __init__(self, url: str, timeout_s: float, send_prefix: bool = False) -> None:
        host, _, port = url[len("openpi://"):].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise SetupError(f"--policy {url!r}: write openpi://HOST:PORT")
        try:
            import PIL  # noqa: F401
            from websockets.sync.client import connect  # noqa: F401
        except ImportError:
            raise SetupError("openpi:// needs websockets and Pillow: pip install websockets pillow") from None
        self.uri, self.timeout_s, self.send_prefix = f"ws://{host}:{port}", timeout_s, send_prefix
        self.local = threading.local()
        self.metadata = self._connection_metadata()

    def _connect(self):
        from websockets.sync.client import connect

        connection = connect(self.uri, compression=None, max_size=None, open_timeout=CONNECT_TIMEOUT_S)
        metadata = openpi_unpack(connection.recv(timeout=CONNECT_TIMEOUT_S))
        return connection, metadata

    def _connection_metadata(self) -> Dict[str, Any]:
        """Connect once up front, so an unreachable policy server stops the run before it starts."""
        try:
            connection, metadata = self._connect()
        except Exception as error:
            raise SetupError(f"no openpi policy server at {self.uri}: {type(error).__name__}: {error}") from None
        connection.close()
        return metadata if isinstance(metadata, dict) else {}

    def declared_inputs(self) -> Any:
        """The inputs the server's metadata declares ("expects" or LeRobot-style "input_features": request
        key -> shape), checked before the first episode; None when it declares none (openpi's own
        servers send their policy's metadata, which names no shapes)."""
        for key in ("expects", "input_features"):
            if key in self.metadata:
                return self.metadata[key]
        return None

    def __call__(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any],
                 prefix: Optional[np.ndarray] = None) -> np.ndarray:
        if getattr(self.local, "connection", None) is None:
            self.local.connection, _ = self._connect()
        connection = self.local.connection
        request = openpi_observation(observation, task_info)
        if self.send_prefix and prefix is not None:
            request["prefix_actions"] = np.asarray(prefix, dtype=np.float32)
        connection.send(openpi_pack(request))
        try:
            reply = connection.recv(timeout=self.timeout_s)
        except TimeoutError:
            self._drop_connection()
            raise PolicyTimeout(f"the openpi policy server at {self.uri} sent no actions within "
                                f"{self.timeout_s:g} s") from None
        if isinstance(reply, str):  # the server's traceback; it closes the connection next
            self._drop_connection()
            raise PolicyError(f"openpi policy server failed:\n{reply}")
        return np.asarray(openpi_unpack(reply)["actions"])

    def _drop_connection(self) -> None:
        self.local.connection.close()
        self.local.connection = None
