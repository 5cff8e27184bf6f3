"""remp's modules sit on floors, and an import only ever goes down or sideways; no two modules import each other,
however indirectly. Every import counts: at the top of a file, inside a function, or under TYPE_CHECKING.

    python tests/test_layers.py      # prints the floors, the upward imports and the circles
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "remp"

# lowest first; a module belongs to the floor of the longest prefix that names it
FLOORS: list[tuple[str, list[str]]] = [
    (
        "plain data, machine facts",
        [
            "logger",
            "cpu_features",
            "cache_dir",
            "sockets",
            "nodes",
            "outputs",
            "step_log",
            "block_pool",
            "replicas",
            "guided",
            "penalties",
            "parallel_sampling",
            "sampling_params",
            "request",
            "scheduler",
            "detokenizer",
            "kv_cache",
            "memory",
            "multinode.protocol",
            "multinode.net",
            "bench.datasets",
            "bench.metrics",
            "bench.timeline",
            "tools",
            "policy.perf_model",
            "sim.pipeline",
            "router",
        ],
    ),  # fmt: skip
    ("model description", ["config", "sharding", "topology", "engine_args"]),
    ("kernels", ["kernels"]),
    ("model", ["model", "shard_state", "sampler"]),
    ("planner (pure)", ["planner"]),
    ("driver <-> worker messages", ["messages"]),
    ("worker side", ["model_runner", "comm", "shm_allreduce", "rendezvous", "reshard", "worker"]),
    ("pool (driver side)", ["multinode", "executor"]),
    ("switch (driver side)", ["switch"]),
    ("policy", ["policy"]),
    ("engine", ["engine", "output_processor"]),
    ("front ends", ["entrypoints", "sim", "bench", ""]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """remp modules `path` imports (names relative to remp; "" is the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "remp":
            base = node.module.removeprefix("remp").lstrip(".")
            names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("remp").lstrip(".") for a in node.names if a.name.split(".")[0] == "remp"]
        found |= {n for n in names if n in known}
    return found


def floor_of(module: str) -> int:
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") or p == "") and len(p) > best:
                best, floor = len(p), i
    return floor


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in g.items() for d in deps if floor_of(d) > floor_of(m))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor():
    assert [m for m in modules() if floor_of(m) is None] == []


def test_no_upward_imports():
    assert upward(graph()) == []


def test_no_circles():
    assert circles(graph()) == []


if __name__ == "__main__":
    g = graph()
    for i, (name, _) in enumerate(FLOORS):
        print(f"{i:2d} {name}: {', '.join(sorted(m or 'remp' for m in g if floor_of(m) == i))}")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports")
    print(f"upward imports: {len(upward(g))}", *(f"  {m} -> {d}" for m, d in upward(g)), sep="\n")
    print(f"circles: {len(circles(g))}", *(f"  {' <-> '.join(c)}" for c in circles(g)), sep="\n")
