"""Where each generation of the workers' torch.distributed world meets: a TCP store the driver hosts, each
generation under its own prefix (`store://HOST:PORT/genN`, which `WorkerComm` parses)."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from remp.sockets import listening_socket


class Rendezvous:
    def __init__(self, addr: str = "127.0.0.1", port: int = 0, timeout_s: float = 300.0):
        """Listens on `addr` only (the store would listen on every interface given just a port; it has no
        authentication). Port 0: the OS picks a free port as the socket binds it (a port found free and bound
        later by the first worker can be taken in between; CI once lost a run to that)."""
        self._sock = listening_socket(addr, port)  # the store serves on its fd: kept open as long as the store
        self.store = dist.TCPStore(
            addr,
            self._sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            master_listen_fd=self._sock.fileno(),
        )
        self.addr, self.port = addr, self.store.port

    def url(self, generation: int) -> str:
        return f"store://{self.addr}:{self.port}/gen{generation}"

    def forget_generations_before(self, generation: int) -> None:
        """Delete the keys of the generations every worker has left (a server runs for months)."""
        for key in self.store.list_keys():
            prefix = key.split("/", 1)[0]
            if prefix.startswith("gen") and prefix[3:].isdigit() and int(prefix[3:]) < generation:
                self.store.delete_key(key)
