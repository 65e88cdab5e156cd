"""Who a request came from: the TCP connection it arrived on, and the client's CURVE key."""

from __future__ import annotations

import glob
import logging
import os
import socket
from typing import Dict, Optional

import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("sim_server")


def peer_of(fd: int) -> str:
    """"host:port" of the TCP peer on socket `fd` now, or "" when it is not (or no longer) a TCP socket."""
    try:
        connection = socket.socket(fileno=fd)
    except OSError:
        return ""
    try:
        host, port = connection.getpeername()[:2]
    except (OSError, ValueError):
        return ""
    finally:
        connection.detach()  # the fd stays libzmq's
    return f"{host}:{port}"


class ConnectionTracker:
    """Which TCP connection a message came on: "fd/host:port", the socket's file descriptor and its
    peer then. libzmq reuses file descriptors, and a reused one has another peer, so the name never
    stands for two connections; and it is read from the socket itself, never from the monitor's
    events, which may arrive after the message on a busy machine.

    A connection is open while its fd still has its peer (`is_open`). The monitor's DISCONNECTED
    events (the loop polls `monitor`) say when to look again.
    """

    def __init__(self, frontend: zmq.Socket) -> None:
        self.frontend = frontend
        self.monitor = frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    @staticmethod
    def connection_of(frame: zmq.Frame) -> Optional[str]:
        """The connection a frame came on, or None when libzmq cannot say (not TCP)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return None
        peer = peer_of(fd)
        return f"{fd}/{peer}" if peer else None

    @staticmethod
    def is_open(connection: str) -> bool:
        fd, _, peer = connection.partition("/")
        return peer_of(int(fd)) == peer

    @staticmethod
    def peer(connection: Optional[str]) -> Optional[str]:
        return connection.partition("/")[2] if connection else None

    def some_closed(self) -> bool:
        """Whether the monitor saw a connection close since the last call."""
        closed = False
        while True:
            try:
                zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return closed
            closed = True

    def close(self) -> None:
        self.frontend.disable_monitor()
        self.monitor.close(linger=0)


class CurveAuth:
    """CURVE encryption plus an allow-list of client keys (a ZAP handler started before bind)."""

    def __init__(self, context: zmq.Context, secret_key_file: str, clients_folder: str) -> None:
        self.secret_key_file = secret_key_file
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=clients_folder)
        log.info("CURVE on: admitting the %d client keys in %s",
                 len(glob.glob(os.path.join(clients_folder, "*.key"))), clients_folder)

    def configure(self, frontend: zmq.Socket) -> None:
        frontend.curve_publickey, frontend.curve_secretkey = zmq.auth.load_certificate(self.secret_key_file)
        frontend.curve_server = True

    @staticmethod
    def key_of(frame: zmq.Frame) -> Optional[str]:
        """The CURVE public key of the client a frame came from."""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return None

    def stop(self) -> None:
        self.authenticator.stop()


def curve_problem(secret_key_file: str, clients_folder: str) -> Optional[str]:
    """Why these CURVE settings cannot work, or None (also None when CURVE is off)."""
    if not secret_key_file and not clients_folder:
        return None
    if not zmq.has("curve"):
        return "this libzmq has no CURVE support; install pyzmq from PyPI (its wheels bundle libsodium)"
    if not os.path.isfile(secret_key_file):
        return f"--curve-secret-key {secret_key_file!r} is not a file (make one with --gen-keys DIR)"
    if not os.path.isdir(clients_folder):
        return f"--curve-clients {clients_folder!r} must be a folder of allowed client .key files"
    try:
        _, secret = zmq.auth.load_certificate(secret_key_file)
    except (OSError, ValueError) as error:
        return f"cannot read the CURVE key file {secret_key_file!r}: {error}"
    if secret is None:
        return f"{secret_key_file!r} holds no secret key: pass the server.key_secret file"
    return None


def generate_keys(folder: str) -> None:
    """server.key(_secret) for the server, client.key(_secret) for a client; client.key goes in --curve-clients."""
    os.makedirs(folder, exist_ok=True)
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        print(f"wrote {public} and {secret}")
    print(f"serve:  --curve-secret-key {folder}/server.key_secret --curve-clients DIR_WITH_client.key\n"
          f"client: --server-key {folder}/server.key --client-key {folder}/client.key_secret")


class BindError(Exception):
    """The frontend cannot listen where it was asked to; the message says why in one line."""


def bind_frontend(context: zmq.Context, bind: str, options: Dict[int, int], curve: Optional[CurveAuth]) -> zmq.Socket:
    """The ROUTER frontend, bound: linger 0, sends that never block, no handover of routing ids, and
    `options`. Warns when it listens beyond loopback without CURVE."""
    frontend = context.socket(zmq.ROUTER)
    for option, value in {zmq.LINGER: 0, zmq.ROUTER_MANDATORY: 1, **options}.items():
        frontend.setsockopt(option, value)
    if curve is not None:
        curve.configure(frontend)
    try:
        frontend.bind(bind)
    except zmq.ZMQError as error:
        frontend.close(linger=0)
        raise BindError(bind_problem(bind, error)) from None
    if curve is None and not is_loopback(bind):
        log.warning("listening on %s without CURVE: anyone who can reach it can run simulators; see "
                    "docs/security.md", bind)
    return frontend


def bind_problem(bind: str, error: zmq.ZMQError) -> str:
    """One line on why the frontend could not bind."""
    if error.errno == zmq.EADDRINUSE:
        return (f"cannot listen on {bind}: the address is already in use (another sim_server?); "
                "pick another port with --port N")
    return (f"cannot listen on {bind}: {error.strerror}; --bind takes a ZMQ address such as tcp://*:5555 "
            "or tcp://127.0.0.1:5555")


def is_loopback(bind: str) -> bool:
    host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
    return bind.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1")
