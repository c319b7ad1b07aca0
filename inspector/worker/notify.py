"""The systemd notify protocol (``Type=notify``, ``WatchdogSec=``) without a dependency.

systemd passes a datagram socket in ``NOTIFY_SOCKET``: a filesystem path, or an abstract socket
written with a leading ``@`` (a NUL byte on the wire). Each message is newline-separated
``KEY=value`` assignments. See sd_notify(3).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
USEC_PER_S = 1_000_000
# Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends, so one late ping is no kill.
WATCHDOG_PING_FRACTION = 0.5


class Notifier:
    """Tells systemd about readiness, liveness and shutdown.

    Every method returns False only when a message was due and could not be sent (the worker
    counts those); with no ``NOTIFY_SOCKET`` it does nothing and returns True. It never raises.

    Args:
        env: the environment to read (default ``os.environ``).
        pid: this process's id, compared with ``WATCHDOG_PID`` (default ``os.getpid()``).
    """

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get(ENV_NOTIFY_SOCKET, ""))
        self._pid = os.getpid() if pid is None else pid
        self._pings_are_ours = _pings_are_ours(env.get(ENV_WATCHDOG_PID), self._pid)
        self._watchdog_usec = _watchdog_usec(env.get(ENV_WATCHDOG_USEC)) if self._pings_are_ours else None

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given."""
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often :meth:`watchdog` should be called, or None when no watchdog is armed for us."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec * WATCHDOG_PING_FRACTION / USEC_PER_S

    def ready(self, status: str = "") -> bool:
        """Startup is complete (model, banks, warm-up): ``READY=1``."""
        return self.send({"READY": "1", "STATUS": status} if status else {"READY": "1"})

    def watchdog(self) -> bool:
        """The processing loop is alive: ``WATCHDOG=1``; skipped when the watchdog is another pid's."""
        if not self._pings_are_ours:
            return True
        return self.send({"WATCHDOG": "1"})

    def stopping(self) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        return self.send({"STOPPING": "1"})

    def status(self, text: str) -> bool:
        """A one-line human status shown by ``systemctl status``."""
        return self.send({"STATUS": text})

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one message of ``KEY=value`` assignments; newlines in values become spaces."""
        if self._address is None:
            return True
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: a full receive queue must not stall the processing loop.
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # absent, or a transport (vsock:) this worker does not speak


def _pings_are_ours(owner: str | None, pid: int) -> bool:
    """Whether this process should ping: no ``WATCHDOG_PID``, or ours (a child inherits the env)."""
    if owner is None:
        return True
    try:
        return int(owner) == pid
    except ValueError:
        return False


def _watchdog_usec(value: str | None) -> int | None:
    try:
        usec = int(value or "")
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
