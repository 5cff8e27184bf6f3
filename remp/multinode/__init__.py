"""A pool of workers spread over several machines: the head node's store and the other nodes' agents, the
driver <-> worker links through that store, and the interface gloo binds to. See docs/ARCHITECTURE.md."""
