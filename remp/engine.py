"""LLMEngine: requests in, one scheduling step at a time, RequestOutputs out (vLLM's interface)."""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from remp.config import ModelConfig, max_model_len, resolve_dtype
from remp.cpu_features import cpu_features
from remp.detokenizer import IncrementalDetokenizer
from remp.engine_args import EngineArgs
from remp.executor import LocalExecutor, MultiprocExecutor, WorkerError, exit_if_spawning_worker
from remp.guided.compiler import GuidedCompiler
from remp.guided.matcher import GuidedMatcher, fill_masks
from remp.kernels.build import build_all as build_kernels
from remp.kv_cache import kv_bytes_per_block
from remp.logger import init_logger
from remp.messages import StepMsg, StepResult
from remp.model.attention import SeqChunk
from remp.model.reader import open_checkpoint
from remp.multinode.head import ClusterHost
from remp.multinode.net import bind_gloo_toward
from remp.output_processor import append_token, record_prompt_logprobs, request_output
from remp.outputs import RequestOutput
from remp.parallel_sampling import ParentRequest, sequence_params
from remp.penalties import PenaltyHistory
from remp.planner.mode import LIVE, RESTART, SwitchMode, switch_mode
from remp.policy.decide import Decision
from remp.policy.runner import LoadCounts, PolicyRunner
from remp.replicas import InFlight, Replica, rebuild, route
from remp.request import Request, Status
from remp.sampler import SampleRow
from remp.sampling_params import SamplingParams
from remp.scheduler import Scheduler
from remp.step_log import StepLog
from remp.switch.host import BlockOwner, WorkerFailureGuard
from remp.switch.on_driver import PendingSwitch, SwitchDriver, SwitchInProgress
from remp.switch.recovery import recover
from remp.switch.report import SwitchReport
from remp.topology import Topology, parse_shape
from remp.worker import start_fork_server

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine lost a worker and cannot serve until it is restarted."""


@dataclass
class EngineStats:
    # driver <-> worker cost of a step alone in flight: wall time from submit to result minus the sampler
    # worker's own time (pickling, pipes, scheduling handoff); recent steps only
    control_overhead_s: deque = field(default_factory=lambda: deque(maxlen=4096))
    switches: list = field(default_factory=list)
    prompt_tokens: int = 0  # prompt tokens computed (prefill; recomputed ones count again)


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs: Any):
        exit_if_spawning_worker()
        self.args = args = args or EngineArgs.from_kwargs(**kwargs)
        self.max_workers = args.max_workers or (
            args.data_parallel_size * args.tensor_parallel_size * args.pipeline_parallel_size
        )
        if args.nnodes > 1:
            bind_gloo_toward(args.master_addr)  # before the fork server starts: its workers inherit it
            if args.master_addr.startswith("127.") or args.master_addr in ("localhost", "::1"):
                logger.warning(
                    "master_addr %s is a loopback address: only nodes on this machine can join", args.master_addr
                )
        if self.max_workers > 1 or args.distributed_executor_backend == "mp":
            start_fork_server()
        reader = open_checkpoint(args.model)
        self.model_config: ModelConfig = reader.config
        cfg = self.model_config
        self.dtype, why = resolve_dtype(args.dtype, cfg, args.device)
        slow = self.dtype == torch.bfloat16 and args.device == "cpu" and not cpu_features().native_bf16
        (logger.warning if slow else logger.info)("dtype %s (%s)", str(self.dtype).removeprefix("torch."), why)
        self.max_model_len = max_model_len(args.max_model_len, cfg)
        topology = Topology(args.tensor_parallel_size, args.pipeline_parallel_size, dp=args.data_parallel_size)
        topology.validate(cfg, self.max_workers)
        self.num_kv_blocks = args.num_kv_blocks or int(args.kv_cache_memory_gb * 2**30 // self._block_bytes(topology))
        if self.num_kv_blocks * args.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks * args.block_size} tokens, fewer than max_model_len="
                f"{self.max_model_len}: raise kv_cache_memory_gb / num_kv_blocks or lower max_model_len"
            )
        torch.manual_seed(args.seed)
        self.error: Exception | None = None
        self.recovering = False  # a lost worker's recovery is under way (the server reports "degraded")
        self.tokenizer = reader.load_tokenizer()
        self.eos_token_ids = frozenset(
            cfg.eos_token_ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        )
        if args.device == "cpu":
            build_kernels()  # once, here, rather than in every worker at its first step
        self.executor = self._start_executor(reader, topology)
        self.replicas = [Replica(self._new_scheduler(self.num_kv_blocks)) for _ in range(topology.dp)]
        self.requests: dict[str, Request] = {}
        self._parents: dict[str, ParentRequest] = {}  # requests of several sequences (n > 1, best_of)
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self.stats = EngineStats()
        self._drained_outputs: list[RequestOutput] = []
        self.num_steps = 0  # steps completed
        self.step_log = StepLog()  # when steps finished: switch reports
        self.switcher = SwitchDriver(self, args.switch_staging_gb, args.switch_precopy_duty, args.switch_timeout_s)
        self.policy: PolicyRunner | None = None
        if args.topology_policy == "auto":
            if not isinstance(self.executor, MultiprocExecutor):
                self.shutdown()
                raise ValueError("--topology-policy auto needs a pool to switch: start with max_workers > 1")
            try:
                self.policy = PolicyRunner.create(self)
            except BaseException:
                self.shutdown()
                raise

    @functools.cached_property
    def guides(self) -> GuidedCompiler:
        """Structured output's grammars, compiled once per spec for this tokenizer (made on first use)."""
        return GuidedCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))

    def _new_scheduler(self, num_blocks: int) -> Scheduler:
        a = self.args
        return Scheduler(num_blocks, a.block_size, a.max_num_seqs, a.max_num_batched_tokens, a.enable_prefix_caching)

    @property
    def scheduler(self) -> Scheduler:
        """Replica 0's scheduler: the engine's only one without data parallelism (see `replicas`)."""
        return self.replicas[0].scheduler

    def _block_bytes(self, topology: Topology) -> int:
        """KV bytes of one logical block summed over every worker of every replica (replicated KV heads count
        each time): a budget buys this many blocks for each replica."""
        cfg = self.model_config
        specs = [topology.spec(cfg, w) for w in topology.placement]
        return sum(
            kv_bytes_per_block(len(s.layers), len(s.kv_heads), cfg.head_dim, self.args.block_size, self.dtype)
            for s in specs
        )

    def _start_executor(self, reader, topology: Topology):
        args = self.args
        kwargs = dict(
            model=args.model,
            dtype=self.dtype,
            num_blocks=self.num_kv_blocks,
            block_size=args.block_size,
            max_model_len=self.max_model_len,
            device=args.device,
            timeout_s=args.worker_timeout_s,
            shm_elems=args.max_num_batched_tokens * self.model_config.hidden_size,
            shm_slots=self.max_workers,
        )
        if self.max_workers == 1 and args.distributed_executor_backend != "mp" and args.nnodes == 1:
            return LocalExecutor(reader, topology, MultiprocExecutor.worker_config(1, **kwargs))
        link_Bps = (args.intra_node_bandwidth_gbs * 1e9, args.inter_node_bandwidth_gbs * 1e9)
        cluster = None
        if args.nnodes > 1:
            cluster = ClusterHost(
                args.nnodes, args.master_addr, args.master_port, args.local_workers, args.node_join_timeout_s
            )
        cfg = MultiprocExecutor.worker_config(topology.size, **kwargs)
        return MultiprocExecutor(topology, cfg, cluster=cluster, link_Bps=link_Bps)

    @property
    def topology(self) -> Topology:
        return self.executor.topology

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int] | dict | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        """Queue a request. `prompt` is text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...}
        (with "cache_salt": prefix-cache blocks are shared only among prompts with the same salt, as vLLM).
        Raises ValueError (and queues nothing) for an empty or too-long prompt or a duplicate id."""
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests or request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        text, ids = self._tokenize(prompt, prompt_token_ids)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        self.check_prompt(ids)
        params.check_vocab(self.model_config.vocab_size)
        guide = self.guides.compile(params.guided) if params.guided is not None else None  # ValueError: refused
        if params.sequences == 1:
            requests = [self._request(request_id, text, ids, params, guide, salt=salt)]
        else:  # one request per sequence; the prefix cache shares the prompt's KV among them
            parent = self._parents[request_id] = ParentRequest(request_id, params.n)
            parent.sequences = requests = [
                self._request(f"{request_id}#{i}", text, ids, sequence_params(params, i), guide, parent, salt)
                for i in range(params.sequences)
            ]
        for req in requests:
            self.requests[req.request_id] = req
            req.replica = route(self.replicas, req)
            self.replicas[req.replica].scheduler.add(req)
            if self.policy is not None:
                self.policy.arrival(req)
        return request_id

    def _request(
        self, request_id: str, text, ids: list[int], params: SamplingParams, guide, parent=None, salt: str | None = None
    ) -> Request:
        room = self.max_model_len - len(ids)
        return Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            max_tokens=min(params.max_tokens or room, room),
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
                params.min_tokens,
            ),
            guide=GuidedMatcher(guide) if guide is not None else None,
            history=PenaltyHistory(ids) if params.has_penalties else None,
            parent=parent,
            cache_salt=salt,
        )

    def check_prompt(self, ids: list[int]) -> None:
        """ValueError unless `ids` is a prompt this engine can run: non-empty, room to generate, in the vocabulary."""
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary (size {self.model_config.vocab_size}): {bad[:5]}")

    def _tokenize(self, prompt, prompt_token_ids) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt, prompt_token_ids = None, prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if prompt_token_ids is None and isinstance(prompt, (list, tuple)):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt, list(prompt_token_ids)
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be text, token ids or a dict, not {type(prompt).__name__}")
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)

    def abort_request(self, request_id: str | list[str]) -> None:
        busy = self.busy_requests()
        ids = [request_id] if isinstance(request_id, str) else request_id
        for rid in [r.request_id for i in ids if (p := self._parents.pop(i, None)) for r in p.sequences] + ids:
            req = self.requests.pop(rid, None)
            if req is not None and not req.finished:
                req.status, req.finish_reason = Status.FINISHED, "abort"
                scheduler = self.replicas[req.replica].scheduler
                if req in busy:  # its blocks are still being written: free them when its batch returns
                    scheduler.forget(req)
                else:
                    scheduler.free(req)

    def has_unfinished_requests(self) -> bool:
        return any(r.scheduler.has_unfinished() for r in self.replicas) or bool(self._drained_outputs)

    def get_num_unfinished_requests(self) -> int:
        return sum(len(r.scheduler.waiting) + len(r.scheduler.running) for r in self.replicas)

    # ---- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of the requests that progressed. With pipeline parallelism up
        to `pp` micro-batches are in flight: this submits until the pipeline is full, then completes the oldest.
        A switch in progress moves on here too (its cut-over happens between two steps)."""
        if self._drained_outputs:
            out, self._drained_outputs = self._drained_outputs, []
            return out
        return self._step_once()

    @torch.inference_mode()
    def _step_once(self) -> list[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after a worker failure: {self.error}")
        self.advance_switch()
        if self.policy is not None and self.switching is None and not self.recovering:
            self._act_on(self.policy.tick(self.policy_load()))
        with self.fatal_worker_errors() as guard:
            for i, rep in enumerate(self.replicas):
                while len(rep.in_flight) < self.executor.max_in_flight and self._submit_next(i):
                    pass
            oldest = {rep.in_flight[0].step_id: rep for rep in self.replicas if rep.in_flight}
            if not oldest:
                return []
            alone = sum(len(rep.in_flight) for rep in self.replicas) == 1
            result = self.executor.wait(oldest)
            rep = oldest[result.step_id]
            if alone:
                self.stats.control_overhead_s.append(time.perf_counter() - rep.in_flight[0].submitted - result.worker_s)
        if guard.recovered:  # the requests go on after recomputing their KV
            return []
        outputs = self._process(rep, rep.in_flight.popleft(), result)
        self.step_log.record(len(outputs))
        self.num_steps += 1
        return outputs

    @contextmanager
    def fatal_worker_errors(self) -> Iterator[WorkerFailureGuard]:
        """A lost worker is recovered from (switch/recovery.py) and the block is cut short (`.recovered`); any
        other worker failure, or a recovery that fails, ends this engine: remember why, stop the workers,
        re-raise."""
        guard = WorkerFailureGuard()
        try:
            yield guard
        except WorkerError as e:
            report = None
            if not self.recovering:
                self.recovering = True
                try:
                    report = recover(self, self.switcher, e)
                except Exception as failed:  # e.g. no topology of the survivors fits: the engine stops, saying why
                    e = failed if isinstance(failed, WorkerError) else WorkerError(f"{e}\nrecovery failed: {failed}")
                finally:
                    self.recovering = False
            if report is None:
                self.error = e
                self.executor.shutdown(grace_s=1.0)  # survivors may be stuck in a collective with the lost worker
                raise e from None
            self.stats.switches.append(report)
            guard.recovered = True

    def busy_requests(self) -> set[Request]:
        """Requests in a micro-batch still in the pipeline."""
        return set().union(*(rep.busy() for rep in self.replicas))

    def _submit_next(self, replica: int) -> bool:
        rep = self.replicas[replica]
        batch = rep.scheduler.schedule(rep.busy(), self.executor.max_in_flight)
        if not batch.scheduled:
            return False
        now = time.time()
        chunks, sampled = [], []
        for req, n in batch.scheduled:
            start = req.num_computed_tokens
            done = start + n == len(req.token_ids)
            self.stats.prompt_tokens += max(0, min(n, req.num_prompt_tokens - start))
            chunks.append(
                SeqChunk(req.token_ids[start : start + n], start, list(req.block_ids), done, _prompt_rows(req, n))
            )
            req.num_computed_tokens += n
            if done:
                sampled.append(req)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        guided = [r for r in sampled if r.guide is not None]
        masks = dict(zip(guided, fill_masks([r.guide for r in guided]))) if guided else {}
        rows = [
            SampleRow.of(r.params, r.num_output_tokens, self._banned(r), history=r.history, mask=masks.get(r))
            for r in sampled
        ]
        step_id, submitted = next(self._step_ids), time.perf_counter()
        self.executor.submit(StepMsg(step_id, chunks, rows), replica)
        rep.in_flight.append(InFlight(step_id, batch, sampled, submitted, [c.start_pos for c in chunks]))
        return True

    def _banned(self, req: Request) -> tuple[int, ...]:
        """min_tokens: EOS and stop token ids cannot be sampled before the request has that many tokens."""
        if req.num_output_tokens >= req.params.min_tokens:
            return ()
        return tuple(sorted(req.eos_token_ids | set(req.params.stop_token_ids)))

    def _process(self, rep: Replica, done: InFlight, result: StepResult) -> list[RequestOutput]:
        now = time.time()
        out, scheduler = result.sampled, rep.scheduler
        for k, entries in (result.prompt_logprobs or {}).items():
            req, _ = done.batch.scheduled[k]
            record_prompt_logprobs(req, done.starts[k], entries, self.tokenizer)
        for req, _ in done.batch.scheduled:  # their KV of this step is written: full blocks become findable
            scheduler.cache_computed(req)
        progressed = []
        for row, req in enumerate(done.sampled):
            if req.finished:  # aborted while its micro-batch was in flight: freed below
                continue
            top = out.top_logprobs[row] if out.top_logprobs else []
            token = out.token_ids[row]
            append_token(req, token, out.logprobs[row], out.ranks[row], top, self.tokenizer, self.max_model_len)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            if req.finished:
                req.metrics.finished_time = now
                if self.policy is not None:
                    self.policy.finished(req)
                scheduler.free(req)
                self.requests.pop(req.request_id, None)
                if req.parent is not None and req.parent.finished:
                    self._parents.pop(req.parent.request_id, None)
            progressed.append(req.parent or req)
        for req, _ in done.batch.scheduled:
            if req.finished and req.block_ids:  # aborted while in flight: its blocks were kept until now
                scheduler.free(req)
        outputs = [
            request_output(r.sequences[0] if isinstance(r, ParentRequest) else r) for r in dict.fromkeys(progressed)
        ]
        return [o for o in outputs if o is not None]

    # ---- topology switches --------------------------------------------------------------------------------
    def reconfigure(
        self,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        layer_split: list[int] | None = None,
        mode: str | SwitchMode = LIVE,
        data_parallel_size: int = 1,
    ) -> SwitchReport:
        """Change TP/PP with requests in flight and return when the new topology serves. mode="live" moves the
        weights while this engine keeps stepping (their outputs come from the next step() calls) and pauses only
        to move the KV cache and swap shards; mode="stop" moves everything in the pause; mode="restart" is the
        baseline a user has today (stop the workers, start new ones from the checkpoint, recompute the KV).
        An impossible target raises ValueError before anything moves; a switch called off before the cut-over
        raises SwitchAborted; in both cases the old topology keeps serving."""
        done: dict = {}
        self.start_reconfigure(
            tensor_parallel_size,
            pipeline_parallel_size,
            layer_split,
            mode,
            lambda r, e: done.update(r=r, e=e),
            data_parallel_size=data_parallel_size,
        )
        while not done:
            if any(rep.scheduler.has_unfinished() for rep in self.replicas):
                self._drained_outputs += self._step_once()  # keep serving; step() hands these out later
            else:
                self.advance_switch(wait_s=0.05)
        if done["e"] is not None:
            raise done["e"]
        return done["r"]

    def start_reconfigure(
        self,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        layer_split: list[int] | None = None,
        mode: str | SwitchMode = LIVE,
        on_done: Callable[[SwitchReport | None, BaseException | None], None] | None = None,
        cause: str = "request",
        data_parallel_size: int = 1,
    ) -> None:
        """Begin a switch and return: it completes during later step() / advance_switch() calls, which then
        call on_done(report, None), or on_done(None, error) if it was called off. Raises ValueError for an
        impossible target and SwitchInProgress while another switch runs (a restart completes at once)."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after a worker failure: {self.error}")
        mode = switch_mode(mode)
        if not mode.multi_node and self.args.nnodes > 1:
            raise ValueError(f"mode {mode.name!r} ({mode.summary}) is not offered on several nodes: use live or stop")
        if self.switching is not None:
            raise SwitchInProgress(str(self.switching.target))
        old = self.topology
        split = tuple(layer_split) if layer_split else None
        target = Topology(tensor_parallel_size, pipeline_parallel_size, None, split, data_parallel_size)
        if target.size > self.max_workers:
            raise ValueError(
                f"{target} needs dp*tp*pp = {target.size} workers, but the pool has at most {self.max_workers}: "
                f"start the engine with max_workers (--max-workers) of at least {target.size}"
            )
        target.validate(self.model_config)
        num_blocks = self.kv_blocks_for(target)
        if not isinstance(self.executor, MultiprocExecutor):
            raise ValueError(
                "a single-worker engine in this process has no pool to reshard; start it with tp*pp > 1 or "
                "max_workers > 1"
            )

        def finish(report: SwitchReport | None, error: BaseException | None) -> None:
            if report is not None:
                report.cause = cause
                self.stats.switches.append(report)
            if self.policy is not None:
                self.policy.switched(error)
            if on_done is not None:
                on_done(report, error)

        if mode.restarts:
            finish(self._restart(old, target, num_blocks), None)
        else:  # a worker found lost as the switch begins: a recovery, which calls the switch off (on_done)
            with self.fatal_worker_errors():
                self.switcher.start(target, num_blocks, mode, finish)

    def _act_on(self, decision: Decision | None) -> None:
        """The policy's decision: a switch it wants starts live while serving goes on."""
        if decision is None or decision.action != "switch":
            return
        tp, pp = parse_shape(decision.target)
        logger.info("topology policy: %s -> %s: %s", decision.current, decision.target, decision.reason)
        try:
            self.start_reconfigure(tp, pp, mode=LIVE, cause="policy")
        except Exception as e:  # e.g. the KV in use does not fit: the old topology serves on
            self.policy.refused(decision.target, e)

    def policy_load(self) -> LoadCounts:
        """What the policy observes of the engine between steps."""
        s = [rep.scheduler for rep in self.replicas]
        waiting, running = sum(len(x.waiting) for x in s), sum(len(x.running) for x in s)
        return LoadCounts(self.topology.tp, self.topology.pp, waiting, running, sum(x.num_blocks_used() for x in s))

    def check_workers(self) -> None:
        """Notice a worker lost while nothing runs (and recover): called by a server's idle loop."""
        if self.error is None and isinstance(self.executor, MultiprocExecutor):
            with self.fatal_worker_errors():
                self.executor.poll()

    @property
    def switching(self) -> PendingSwitch | None:
        """The switch in progress (its target and mode), or None."""
        return self.switcher.pending

    def advance_switch(self, wait_s: float = 0.0) -> None:
        """Move a switch in progress on (cut over when the workers are ready); step() does this every time."""
        with self.fatal_worker_errors():
            self.switcher.advance(wait_s)

    # ---- what the switch driver and recovery ask of the engine (switch/host.py) -------------------------------
    def kv_blocks_for(self, target: Topology) -> int:
        num_blocks = self.args.num_kv_blocks or int(self.args.kv_cache_memory_gb * 2**30 // self._block_bytes(target))
        if num_blocks * self.args.block_size < self.max_model_len:
            raise ValueError(
                f"{target} leaves room for {num_blocks * self.args.block_size} KV tokens, fewer than "
                f"max_model_len={self.max_model_len}"
            )
        return num_blocks

    def running(self, replica: int) -> list[Request]:
        return list(self.replicas[replica].scheduler.running)

    def blocks_in_use(self, replica: int) -> list[int]:
        return self.replicas[replica].scheduler.blocks_in_use()

    def cached_free(self, replica: int) -> list[int]:
        return self.replicas[replica].scheduler.pool.cached_free()

    def block_owners(self, replica: int, full_only: bool) -> dict[int, BlockOwner]:
        rep = self.replicas[replica]
        return rep.scheduler.block_owners(full_only, None, rep.tokens_in_flight() if full_only else {})

    def preempt(self, requests: list[Request]) -> None:
        for req in reversed(requests):  # preempt puts each at the front of the queue: keep their order
            self.replicas[req.replica].scheduler.preempt(req)

    def adopt(
        self, topology: Topology, num_blocks: int, assignment: dict[str, int], block_maps: dict[tuple, dict]
    ) -> None:
        self.executor.use_topology(topology)
        self.replicas = rebuild(self.replicas, topology.dp, num_blocks, assignment, block_maps, self._new_scheduler)
        for d, rep in enumerate(self.replicas):
            for req in [*rep.scheduler.running, *rep.scheduler.waiting]:
                req.replica = d
        self.num_kv_blocks = num_blocks

    def forget_in_flight(self) -> None:
        for rep in self.replicas:
            for f in rep.in_flight:
                for req, n in f.batch.scheduled:
                    if req.finished:
                        if req.block_ids:  # aborted while in flight: its blocks were kept until now
                            rep.scheduler.free(req)
                    else:
                        req.num_computed_tokens -= n
            rep.in_flight.clear()

    def requeue_running(self, replicas: set[int]) -> tuple[list[str], int]:
        self.forget_in_flight()
        ids, recompute = [], 0
        for i in sorted(replicas):
            scheduler = self.replicas[i].scheduler
            scheduler.drop_cache()
            running = list(scheduler.running)
            recompute += sum(r.num_computed_tokens for r in running)
            for req in reversed(running):  # preempt puts each at the front of the queue
                scheduler.preempt(req)
            ids += [r.request_id for r in running]
        return ids, recompute

    def drain(self) -> None:
        """Finish the micro-batches in flight; their outputs are returned by the next step()."""
        while any(rep.in_flight for rep in self.replicas):
            oldest = {rep.in_flight[0].step_id: rep for rep in self.replicas if rep.in_flight}
            with self.fatal_worker_errors() as guard:
                result = self.executor.wait(oldest)
            if guard.recovered:  # nothing left in flight
                return
            rep = oldest[result.step_id]
            self._drained_outputs += self._process(rep, rep.in_flight.popleft(), result)

    def _restart(self, old: Topology, target: Topology, num_blocks: int) -> SwitchReport:
        """What a user does today: stop the engine's workers, start new ones from the checkpoint, re-submit
        every in-flight request (prompt + tokens so far) so its KV is recomputed."""
        t0 = time.perf_counter()
        self.drain()
        t_pause = time.perf_counter()
        _, recompute = self.requeue_running(set(range(len(self.replicas))))
        self.executor.shutdown()
        reader = open_checkpoint(self.args.model)
        self.tokenizer = reader.load_tokenizer()  # a new engine loads its tokenizer too
        self.num_kv_blocks = num_blocks
        self.executor = self._start_executor(reader, target)
        self.adopt(target, num_blocks, {}, {})
        weight_bytes = sum(math.prod(reader.shape(n)) for n in reader.names()) * self.dtype.itemsize
        t_end = time.perf_counter()
        return SwitchReport(
            RESTART.name,
            str(old),
            str(target),
            wall_s=t_end - t0,
            pause_s=t_end - t_pause,
            bytes_moved={"weights": weight_bytes, "kv": 0},
            bytes_moved_in_pause={"weights": weight_bytes, "kv": 0},
            recomputed_tokens=recompute,
            num_kv_blocks=num_blocks,
            longest_step_gap_s=round(t_end - (self.step_log.last_step_time() or t0), 4),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
        for rep in self.replicas:
            rep.scheduler.waiting.clear()
            rep.scheduler.running.clear()
            rep.in_flight.clear()
        self.requests.clear()


def _prompt_rows(req: Request, n: int) -> tuple[int, tuple[int, ...]] | None:
    """What a chunk of n tokens from req.num_computed_tokens gives of req's prompt logprobs: (top-k, the next
    prompt token of each of its first tokens), or None."""
    k, start = req.params.prompt_logprobs, req.num_computed_tokens
    rows = min(n, req.num_prompt_tokens - 1 - start)
    if k is None or rows <= 0:
        return None
    return k, tuple(req.prompt_token_ids[start + 1 : start + 1 + rows])
