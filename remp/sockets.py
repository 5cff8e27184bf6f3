"""A listening TCP socket, made before anything else can take its port (the HTTP server's, the rendezvous
store's). Bound and listening at once: on Linux two SO_REUSEADDR sockets may bind one port until one listens."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """`host` as a name or address (IPv4 or IPv6; "" for every interface); port 0 lets the OS pick one.
    OSError if nothing of `host` can listen on `port`."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    error: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"no address for {host!r}")


def url_host(sock: socket.socket) -> str:
    """The socket's address as a URL writes it (IPv6 in brackets)."""
    addr = sock.getsockname()[0]
    return f"[{addr}]" if sock.family == socket.AF_INET6 else addr
