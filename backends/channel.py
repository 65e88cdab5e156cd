"""The channel between the server's loop and a simulator process: framed messages on a socket pair.

A message is an 8-byte big-endian length and that many bytes; an empty message (CLOSE_CALL) asks
the simulator process to close its simulator and exit. Both ends use this module, so the framing
is defined once and depends on no interpreter's internals (a simulator may run under another
Python, --python). Standard library only.

The simulator process reads and writes with the blocking functions; the loop never blocks on a
simulator: it reads with an `IncomingMessage` and writes with an `OutgoingMessage` on a
non-blocking socket, a piece whenever the poller says the socket is ready, so a simulator that
stalls mid-reply stalls only its own session.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

HEADER = struct.Struct("!Q")
CLOSE_CALL = b""
# How much the loop reads from one simulator per wake-up before it looks at the others again.
READ_SLICE_BYTES = 4 * 1024 * 1024


def framed(body: bytes) -> bytes:
    """`body` with its length header: what goes on the socket."""
    return HEADER.pack(len(body)) + body


def send_message(channel: socket.socket, body: bytes) -> None:
    """Write one message, blocking (the simulator process's side)."""
    channel.sendall(framed(body))


def receive_message(channel: socket.socket) -> bytes:
    """Read one message, blocking (the simulator process's side); EOFError when the other end closed."""
    size = HEADER.unpack(_read_exactly(channel, HEADER.size))[0]
    return bytes(_read_exactly(channel, size))


def _read_exactly(channel: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = channel.recv_into(view[got:])
        if count == 0:
            raise EOFError("the channel was closed")
        got += count
    return buffer


class IncomingMessage:
    """One message read piece by piece from a non-blocking socket, straight into one buffer."""

    def __init__(self) -> None:
        self.header = bytearray()
        self.body: Optional[bytearray] = None
        self.got = 0

    def read_from(self, channel: socket.socket) -> Optional[bytearray]:
        """Read what the socket has now (at most READ_SLICE_BYTES); the whole body once it has come,
        else None. EOFError when the other end closed, OSError when it broke."""
        budget = READ_SLICE_BYTES
        while budget > 0:
            try:
                if self.body is None:
                    chunk = channel.recv(HEADER.size - len(self.header))
                    if not chunk:
                        raise EOFError("the simulator process closed its channel")
                    self.header += chunk
                    if len(self.header) == HEADER.size:
                        self.body = bytearray(HEADER.unpack(self.header)[0])
                    continue
                if self.got == len(self.body):
                    return self.body
                count = channel.recv_into(memoryview(self.body)[self.got:], min(budget, len(self.body) - self.got))
            except BlockingIOError:
                return None
            if count == 0:
                raise EOFError("the simulator process closed its channel")
            self.got += count
            budget -= count
        return self.body if self.body is not None and self.got == len(self.body) else None


class OutgoingMessage:
    """One message written piece by piece to a non-blocking socket."""

    def __init__(self, body: bytes) -> None:
        self.data = memoryview(framed(body))

    @property
    def done(self) -> bool:
        return not self.data

    def write_to(self, channel: socket.socket) -> bool:
        """Write what the socket takes now; True once all is written. OSError when the process is gone."""
        try:
            while self.data:
                self.data = self.data[channel.send(self.data):]
        except BlockingIOError:
            pass
        return self.done
