"""Shard specs for awkward shapes (pure functions, no processes)."""

import pytest
import torch

from remp.model.families import config_from_hf, config_from_hf_dir
from remp.model.reader import open_checkpoint
from remp.model.schema import read_range, shard_tensors, slices, tensor
from remp.sharding import head_split, layer_split, split_evenly
from remp.tools.random_model import tiny_config
from remp.topology import Topology


def cfg(**kw):
    return config_from_hf(tiny_config(**kw))


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


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 3), (2, 2), (5, 1), (6, 1)])
def test_shard_tensors_tile_every_tensor_exactly(tp, pp, model_type):
    """Per stage, the ranks' ranges of a split tensor tile its shard axis (KV heads replicated when tp > kv
    heads: then they cover it; experts: ranks beyond the third hold none); unsplit tensors are whole; every
    layer's tensors live on exactly one stage."""
    c = cfg(model_type=model_type)  # 6 heads / 2 kv heads / 4 layers; 3 experts
    topo = Topology(tp, pp)
    for stage in range(pp):
        held = [shard_tensors(c, topo.spec(c, w)) for w in topo.stage_workers(stage)]
        for name in set().union(*held):
            t = tensor(c, name)
            ranges = sorted(h[name] for h in held if name in h)
            size = t.shape[t.axis]
            if t.split is None:
                assert all(r == (0, size) for r in ranges), name
            elif t.split == "kv" and tp > c.num_key_value_heads:
                assert {i for lo, hi in ranges for i in range(lo, hi)} == set(range(size)), name
            else:
                assert ranges[0][0] == 0 and ranges[-1][1] == size, name
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)
    per_worker = [shard_tensors(c, topo.spec(c, w)) for w in range(topo.size)]
    for layer in range(c.num_hidden_layers):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        assert len({topo.coordinate(w)[0] for w, s in enumerate(per_worker) if name in s}) == 1
    holders = [w for w, s in enumerate(per_worker) if "lm_head.weight" in s]
    assert holders == sorted(topo.stage_workers(pp - 1))  # its vocabulary split over the last stage
    assert sum("model.embed_tokens.weight" in s for s in per_worker) == tp  # replicated on the first stage


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 3)])
def test_tied_lm_head_is_the_last_stages_vocabulary_slices_of_the_embedding(tp, pp):
    """Tied: the first stage holds the embedding whole; a later last stage holds only the vocabulary slices
    its TP ranks compute logits for, which tile the vocabulary; nobody holds an lm_head of its own."""
    c = cfg(tie_word_embeddings=True)
    topo = Topology(tp, pp)
    specs = [topo.spec(c, w) for w in sorted(topo.stage_workers(pp - 1))]
    assert [(v.start, v.stop) for v in (s.vocab for s in specs)] == [
        (r.start, r.stop) for r in split_evenly(c.vocab_size, tp)
    ]
    for w in range(topo.size):
        held = shard_tensors(c, topo.spec(c, w))
        stage = topo.coordinate(w)[0]
        assert "lm_head.weight" not in held
        if stage == 0:
            assert held["model.embed_tokens.weight"] == (0, c.vocab_size)
        elif stage == pp - 1:
            v = topo.spec(c, w).vocab
            assert held["model.embed_tokens.weight"] == (v.start, v.stop)
        else:
            assert "model.embed_tokens.weight" not in held and "model.norm.weight" not in held


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny_qwen3", "tiny_mixtral"])
def test_schema_shapes_match_a_checkpoint(model, request):
    """The schema's shapes and shard axes are those of a real checkpoint (q/k/v biases, q/k norms included); a
    stacked expert tensor is the checkpoint's per-expert tensors, and a range of it reads those experts."""
    from safetensors.torch import load_file

    path = request.getfixturevalue(model)
    c = config_from_hf_dir(path)
    weights = load_file(str(path / "model.safetensors"))
    held = shard_tensors(c, Topology(1, 1).spec(c, 0))
    stacked = {n: [n.replace("*", str(e)) for e in range(c.num_experts)] for n in held if "*" in n}
    assert {n for n in held if n not in stacked} | {e for es in stacked.values() for e in es} == set(weights)
    for name in held:
        w = torch.stack([weights[e] for e in stacked[name]]) if name in stacked else weights[name]
        assert tensor(c, name).shape == tuple(w.shape), name
        assert w[slices(c, name, *held[name])].shape == w.shape
    reader = open_checkpoint(path)
    for name, parts in stacked.items():
        assert torch.equal(read_range(reader, name, 1, 3), torch.stack([weights[e] for e in parts[1:3]]))


def test_topology_validation():
    c = cfg()
    with pytest.raises(ValueError, match="needs dp\\*tp\\*pp = 4 workers"):
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
