"""Engine options, named and defaulted as vLLM's so flags and keyword arguments carry over."""

from __future__ import annotations

from dataclasses import dataclass, fields

from remp.nodes import INTER_NODE_BPS, INTRA_NODE_BPS


def workers_on_node(num_workers: int, nnodes: int, workers_per_node: int | None) -> int:
    """The workers a node runs at start: its --workers-per-node, else an even share of dp*tp*pp."""
    return workers_per_node or num_workers // nnodes


@dataclass
class EngineArgs:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1  # replicas of the TP x PP shape, each with its own KV cache, behind one engine
    max_workers: int | None = None  # the most workers a switch may grow the pool to (None: tp*pp at start)
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0  # KV cache budget of the whole engine (all workers together)
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True  # reuse the KV of prompt prefixes seen before (as vLLM V1, on by default)
    seed: int = 0
    device: str = "cpu"
    # "uni": a single worker runs in this process; "mp": worker processes (always, when tp*pp > 1). None picks
    # "uni" for one worker. A server wants "mp" so the model does not compete with HTTP for this process.
    distributed_executor_backend: str | None = None
    worker_timeout_s: float = 120.0  # a worker silent this long (or a collective stuck this long) is an error
    # live switches: extra memory a worker may use to stage the new shard while the old one serves (over it:
    # stop-the-world instead), the share of time the background copy may take, and how long it may run
    # a worker that dies: go on with the survivors (a switch onto the best topology they can hold), or with
    # `respawn`, start a replacement and keep the topology; off: the engine stops, as vLLM does
    worker_recovery: bool = True
    respawn: bool = False
    switch_staging_gb: float = 2.0
    switch_precopy_duty: float = 0.3
    switch_timeout_s: float = 300.0
    # "auto": a policy picks the topology from the load (live switches among the candidates, by default every
    # shape of the whole pool), from a performance profile measured at start (cached) or given as a file
    topology_policy: str = "manual"
    topology_candidates: str | None = None  # e.g. "TP2xPP1,TP1xPP2"
    perf_profile: str | None = None
    slo_ttft_ms: float | None = None  # None: 5x the fastest candidate's unloaded latency
    slo_tpot_ms: float | None = None
    policy_interval_s: float = 5.0
    policy_min_dwell_s: float = 60.0
    policy_window_s: float = 30.0  # the load is measured over this window
    # several machines (as vLLM's and torchrun's flags): this engine is node 0; the others run
    # `remp serve --headless --node-rank K` and join through the TCP store at master_addr:master_port
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    workers_per_node: int | None = None  # None: tp*pp / nnodes
    node_join_timeout_s: float = 300.0
    # the planner's link figures (GB/s): a byte between two nodes costs intra/inter times one inside a node
    intra_node_bandwidth_gbs: float = INTRA_NODE_BPS / 1e9
    inter_node_bandwidth_gbs: float = INTER_NODE_BPS / 1e9

    @property
    def num_workers(self) -> int:
        """Workers of the starting topology: dp * tp * pp."""
        return self.data_parallel_size * self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_workers(self) -> int:
        """Workers this node runs at start."""
        return workers_on_node(self.num_workers, self.nnodes, self.workers_per_node)

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_workers is not None and (
            not isinstance(self.max_workers, int) or self.max_workers < self.num_workers
        ):
            raise ValueError(
                f"max_workers must be an integer of at least dp*tp*pp = {self.num_workers}, got {self.max_workers!r}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.distributed_executor_backend not in (None, "uni", "mp"):
            raise ValueError(
                f"distributed_executor_backend must be 'uni' or 'mp', got {self.distributed_executor_backend!r}"
            )
        if self.switch_staging_gb < 0 or not 0 < self.switch_precopy_duty <= 1 or self.switch_timeout_s <= 0:
            raise ValueError(
                "switch_staging_gb must be >= 0, switch_precopy_duty in (0, 1] and switch_timeout_s positive, got "
                f"{self.switch_staging_gb}, {self.switch_precopy_duty}, {self.switch_timeout_s}"
            )
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"nnodes must be a positive integer, got {self.nnodes!r}")
        if self.node_rank != 0:
            raise ValueError(
                f"node_rank {self.node_rank}: the engine runs on node 0; start the other nodes with "
                "`remp serve --headless --node-rank K ...`"
            )
        if self.nnodes > 1 and self.workers_per_node is None:
            size = self.num_workers
            if size % self.nnodes:
                raise ValueError(
                    f"dp*tp*pp = {size} workers do not divide over {self.nnodes} nodes: give workers_per_node "
                    "(this node's; each other node gives its own)"
                )
        if self.workers_per_node is not None and self.workers_per_node < 1:
            raise ValueError(f"workers_per_node must be positive, got {self.workers_per_node}")
        if min(self.intra_node_bandwidth_gbs, self.inter_node_bandwidth_gbs) <= 0:
            raise ValueError("the link bandwidths must be positive")
        if self.topology_policy not in ("manual", "auto"):
            raise ValueError(f"topology_policy must be 'manual' or 'auto', got {self.topology_policy!r}")
        if (
            any(x is not None and x <= 0 for x in (self.slo_ttft_ms, self.slo_tpot_ms))
            or min(self.policy_interval_s, self.policy_min_dwell_s) < 0
        ):
            raise ValueError("SLOs must be positive, and the policy's interval and dwell time non-negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known options: {sorted(known)}")
        return cls(**kwargs)
