"""Shard specs for awkward shapes (pure functions, no processes)."""

import pytest

from remp.config import ModelConfig
from remp.sharding import head_split, layer_split, split_evenly, weight_slices
from remp.tools.random_model import tiny_config
from remp.topology import Topology


def cfg(**kw):
    return ModelConfig.from_hf_dict(tiny_config(**kw))


def test_nine_heads_three_kv_on_two_ranks_is_six_plus_three():
    split = head_split(9, 3, 2)
    assert [(len(q), len(kv)) for q, kv in split] == [(6, 2), (3, 1)]
    assert split[1] == (range(6, 9), range(2, 3))


@pytest.mark.parametrize(
    "heads, kv, tp",
    [(9, 3, t) for t in range(1, 10)]
    + [(6, 2, t) for t in range(1, 7)]
    + [(4, 4, t) for t in range(1, 5)]
    + [(32, 8, 12), (14, 2, 5)],
)
def test_head_split_covers_every_head_once_and_keeps_groups(heads, kv, tp):
    split = head_split(heads, kv, tp)
    assert len(split) == tp
    assert sorted(h for q, _ in split for h in q) == list(range(heads))
    group = heads // kv
    for q, kvs in split:
        assert len(q) >= 1 and len(kvs) >= 1
        assert {h // group for h in q} == set(kvs)  # a rank's q heads use exactly its kv heads
        assert len(q) % len(kvs) == 0  # uniform local group size
    sizes = [len(q) for q, _ in split]
    if tp <= kv:
        assert max(sizes) - min(sizes) <= group  # balanced up to one KV group
    else:
        assert {kvh for _, k in split for kvh in k} == set(range(kv))  # replicated, every kv head present


def test_head_split_rejects_tp_beyond_heads():
    with pytest.raises(ValueError, match="between 1 and the number of attention heads"):
        head_split(9, 3, 10)


def test_layer_split_balanced_and_explicit():
    assert [len(r) for r in layer_split(30, 4)] == [8, 8, 7, 7]
    assert layer_split(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="summing to 4"):
        layer_split(4, 2, [2, 3])
    with pytest.raises(ValueError, match="number of layers"):
        layer_split(4, 5)


def test_split_evenly():
    assert split_evenly(1536, 5) == [
        range(0, 308),
        range(308, 615),
        range(615, 922),
        range(922, 1229),
        range(1229, 1536),
    ]


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 3), (2, 2), (5, 1), (6, 1)])
def test_weight_slices_tile_every_tensor_exactly(tp, pp):
    c = cfg()  # 6 heads / 2 kv heads / 4 layers
    topo = Topology(tp, pp)
    per_worker = [weight_slices(c, topo.spec(c, w)) for w in range(topo.size)]
    layer = "model.layers.1."
    q_rows = sorted(
        r
        for s in per_worker
        if layer + "self_attn.q_proj.weight" in s
        for r in range(*s[layer + "self_attn.q_proj.weight"][0].indices(c.num_attention_heads * 16))
    )
    assert q_rows == list(range(c.num_attention_heads * c.head_dim))
    ffn_cols = sorted(
        r
        for s in per_worker
        if layer + "mlp.down_proj.weight" in s
        for r in range(*s[layer + "mlp.down_proj.weight"][1].indices(c.intermediate_size))
    )
    assert ffn_cols == list(range(c.intermediate_size))
    holders = [w for w, s in enumerate(per_worker) if "lm_head.weight" in s]
    assert holders == [topo.sampler_worker]
    assert sum("model.embed_tokens.weight" in s for s in per_worker) == tp  # replicated on the first stage


def test_topology_validation():
    c = cfg()
    with pytest.raises(ValueError, match="needs tp\\*pp = 4 workers"):
        Topology(2, 2).validate(c, num_workers=3)
    with pytest.raises(ValueError, match="attention heads"):
        Topology(7, 1).validate(c)
    with pytest.raises(ValueError, match="number of layers"):
        Topology(1, 5).validate(c)
    with pytest.raises(ValueError, match="positive"):
        Topology(0, 1)
    with pytest.raises(ValueError, match="distinct workers"):
        Topology(2, 1, placement=(0, 0))
    t = Topology(2, 2, placement=(3, 2, 1, 0))
    assert t.coordinate(3) == (0, 0) and t.worker(1, 1) == 0 and t.sampler_worker == 1 and str(t) == "TP2xPP2"
