"""ZeroMQ CURVE on both sides of the wire, and the limits on everything a peer controls.

Server side (the worker): with ``ingest.curve_server_secret_key`` set (a ZeroMQ certificate file
holding the server's secret key, as written by ``zmq.auth.create_certificates``), both worker
sockets become CURVE servers; with ``ingest.curve_allowed_clients_dir`` also set, only clients
whose public certificate is in that directory may connect (ZAP handler). A client with another
key, or a plain client, never gets a message through: its handshake fails before any frame
reaches the worker.

Client side (cameras, ``inspector tail``): :func:`curve_client_configurer` reads the server's
public certificate and the client's own secret certificate. Keys never appear in logs.

:func:`peer_limits` lists every bound on what a peer can make the worker hold, so a review (and
a test) can check that none is unbounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import zmq

from .worker.ingest import OVERSIZE_FACTOR

Configure = Callable[[zmq.Socket], None]

# One ZAP handler per context, kept referenced while its sockets live and stopped before the
# context ends (its socket would otherwise keep ``Context.term()`` waiting forever).
_authenticators: list[tuple[zmq.Context, object]] = []


def _load_keys(path_text: str, option: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from a certificate file; errors name the option, never a key."""
    import zmq.auth

    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, KeyError) as err:  # an unreadable or malformed certificate
        raise ValueError(f"{option}: {path} is not a ZeroMQ certificate ({type(err).__name__})") from None
    if need_secret and secret is None:
        raise ValueError(f"{option}: {path} holds no secret key (use the .key_secret file)")
    return public, secret


def curve_configurer(ingest_cfg, context: zmq.Context | None = None) -> Configure | None:
    """A function that makes a socket a CURVE server, or None when CURVE is not configured.

    Args:
        ingest_cfg: the ingest stage's config (``curve_server_secret_key``,
            ``curve_allowed_clients_dir``).
        context: the context whose sockets are served; the ZAP handler is attached to it.
    """
    secret_file = ingest_cfg.curve_server_secret_key
    if not secret_file:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = _load_keys(secret_file, "ingest.curve_server_secret_key", need_secret=True)
    allowed = ingest_cfg.curve_allowed_clients_dir
    if allowed:
        if not Path(allowed).is_dir():
            raise ValueError(f"ingest.curve_allowed_clients_dir: {allowed} is not a directory")
        context = context or zmq.Context.instance()
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(allowed))
        _authenticators.append((context, auth))

    def configure(socket: zmq.Socket) -> None:
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True

    return configure


def stop_authenticators(context: zmq.Context) -> None:
    """Stop the ZAP handlers attached to ``context``; call before ``context.term()``."""
    for entry in [e for e in _authenticators if e[0] is context]:
        _authenticators.remove(entry)
        entry[1].stop()


def curve_client_configurer(server_public_key_file: str, client_secret_key_file: str) -> Configure:
    """A function that makes a socket a CURVE client of one worker.

    Args:
        server_public_key_file: the worker's certificate (``server.key``; the ``.key_secret``
            file works too, only its public key is read).
        client_secret_key_file: this client's certificate with its secret key
            (``client.key_secret``); the worker admits it when ``client.key`` is in its
            ``curve_allowed_clients_dir``.

    Raises:
        ValueError: a file is missing, unreadable, or lacks the key it must hold.
    """
    server_public, _ = _load_keys(server_public_key_file, "curve server key", need_secret=False)
    client_public, client_secret = _load_keys(client_secret_key_file, "curve client key", need_secret=True)

    def configure(socket: zmq.Socket) -> None:
        socket.curve_serverkey = server_public
        socket.curve_publickey = client_public
        socket.curve_secretkey = client_secret

    return configure


def optional_client_configurer(server_public_key_file: str | None, client_secret_key_file: str | None) -> Configure | None:
    """:func:`curve_client_configurer` when both files are given, None when neither is.

    Raises:
        ValueError: only one of the two is given.
    """
    if not server_public_key_file and not client_secret_key_file:
        return None
    if not (server_public_key_file and client_secret_key_file):
        raise ValueError("CURVE needs both the server's public key and this client's secret key")
    return curve_client_configurer(server_public_key_file, client_secret_key_file)


def peer_limits(cfg) -> dict[str, int]:
    """Every bound on what a peer can make the worker hold, by name (a review list).

    Frames: header and payload bytes, image side and pixels (checked before decoding), messages
    ZeroMQ buffers (RCVHWM), frames queued for the engine. Results: messages buffered per
    subscriber (SNDHWM), results held for Redis while it is away, the stream's length. Banks:
    bytes of one blob and products held. ``ingest.buffered_bytes_max`` is what ZeroMQ may hold
    for the PULL socket at worst: RCVHWM messages of the largest part it accepts
    (``ingest.max_message_bytes``, ``OVERSIZE_FACTOR`` times a valid frame; a larger part makes
    ZeroMQ disconnect the sender before buffering it).

    Args:
        cfg: a :class:`inspector.config.WorkerConfig`.
    """
    from .banks.record import MAX_BLOB_BYTES
    from .wire import MAX_TEXT_CHARS

    ingest, publish, banks = cfg.ingest, cfg.publish, cfg.banks
    return {
        "ingest.max_header_bytes": ingest.max_header_bytes,
        "ingest.max_payload_bytes": ingest.max_payload_bytes,
        "ingest.max_side": ingest.max_side,
        "ingest.max_pixels": ingest.max_pixels,
        "ingest.rcvhwm": ingest.rcvhwm,
        "ingest.queue_size": ingest.queue_size,
        "ingest.max_message_bytes": OVERSIZE_FACTOR * (ingest.max_header_bytes + ingest.max_payload_bytes),
        "ingest.buffered_bytes_max": ingest.rcvhwm * OVERSIZE_FACTOR * (ingest.max_header_bytes + ingest.max_payload_bytes),
        "wire.max_text_chars": MAX_TEXT_CHARS,
        "publish.sndhwm": publish.sndhwm,
        "publish.stream_buffer": publish.stream_buffer,
        "publish.stream_maxlen": publish.stream_maxlen,
        "banks.max_blob_bytes": MAX_BLOB_BYTES,
        "banks.capacity_products": banks.capacity_products,
    }
