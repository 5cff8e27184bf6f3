"""Which local interface reaches the head node: gloo must bind its connections there, not to whatever the
host name resolves to (which, in a container or a network namespace, is often an address no peer can reach)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

SIOCGIFADDR = 0x8915


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(raw[20:24])


def interface_toward(addr: str) -> tuple[str, str]:
    """(interface name, local IPv4 address) this machine uses to reach `addr`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(addr), 9))  # no packet is sent: this only asks the routing table
        ip = s.getsockname()[0]
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == ip:
            return name, ip
    raise OSError(f"no local interface holds {ip}, the address that routes to {addr}")


def bind_gloo_toward(addr: str) -> str:
    """Make gloo and NCCL (in this process and every process it starts afterwards) use the interface that
    reaches `addr`, unless the user chose one (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME). Returns gloo's."""
    unset = [var for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not os.environ.get(var)]
    if unset:
        ifname = interface_toward(addr)[0]
        os.environ.update(dict.fromkeys(unset, ifname))
    return os.environ["GLOO_SOCKET_IFNAME"]
