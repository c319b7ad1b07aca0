"""ZeroMQ CURVE: authentication and encryption of the ingest and result sockets (optional).

With ``ingest.curve_server_secret_key`` set (a ZeroMQ certificate file holding the server's
secret key, as written by ``zmq.auth.create_certificates``), both worker sockets become CURVE
servers; with ``ingest.curve_allowed_clients_dir`` also set, only clients whose public
certificate is in that directory may connect (ZAP handler). Keys never appear in logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import zmq

Configure = Callable[[zmq.Socket], None]

_authenticators: list = []  # one ZAP handler per process; kept referenced while sockets live


def curve_configurer(ingest_cfg, context: zmq.Context | None = None) -> Configure | None:
    """A function that makes a socket a CURVE server, or None when CURVE is not configured."""
    secret_file = ingest_cfg.curve_server_secret_key
    if not secret_file:
        return None
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    path = Path(secret_file)
    if not path.is_file():
        raise ValueError(f"ingest.curve_server_secret_key: {path} does not exist")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"ingest.curve_server_secret_key: {path} holds no secret key")
    allowed = ingest_cfg.curve_allowed_clients_dir
    if allowed:
        if not Path(allowed).is_dir():
            raise ValueError(f"ingest.curve_allowed_clients_dir: {allowed} is not a directory")
        auth = ThreadAuthenticator(context or zmq.Context.instance())
        auth.start()
        auth.configure_curve(domain="*", location=str(allowed))
        _authenticators.append(auth)

    def configure(socket: zmq.Socket) -> None:
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True

    return configure
