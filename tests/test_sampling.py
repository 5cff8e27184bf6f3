import math

import pytest
import torch

from remp.sampler import SamplerOutput, make_generator, sample
from remp.sampling_params import SamplingParams

# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": "x"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        SamplingParams(**kwargs)


def test_params_defaults_and_normalisation():
    sp = SamplingParams()
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert sp.stop == [] and sp.stop_token_ids == [] and not sp.greedy
    sp = SamplingParams(stop="END", stop_token_ids=(5, 6), top_k=-1, max_tokens=None, min_tokens=100)
    assert sp.stop == ["END"] and sp.stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-3).greedy


# ---------------------------------------------------------------- sampler


def _batch(logits, **kw):
    B = logits.shape[0]
    return sample(logits, [SamplingParams(**kw) for _ in range(B)], [None] * B)


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_greedy_is_argmax_with_ties_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(16, 100)
    logits[3, [10, 40, 70]] = 50.0  # tie -> lowest id
    out = _batch(logits, temperature=0.0)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 10
    assert out.ranks == [1] * 16
    assert out.top_logprobs is None


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(64, 300) * 3
    logits[5, [7, 9]] = 40.0  # tie: sort-based masking must keep the lowest id, like argmax
    want = logits.argmax(-1).tolist()
    for _ in range(3):
        assert _batch(logits, temperature=1.5, top_k=1).token_ids == want
        assert _batch(logits, temperature=1.5, top_p=1e-9).token_ids == want
        # min_p=1 keeps only the max prob, but keeps *all* tied maxima (row 5 may pick 7 or 9).
        got = _batch(logits, temperature=1.5, min_p=1.0).token_ids
        assert got[:5] + got[6:] == want[:5] + want[6:] and got[5] in (7, 9)


def _sample_set(probs: list[float], n: int = 4000, **kw) -> set[int]:
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    return set(_batch(logits, **kw).token_ids)


def test_top_k_top_p_min_p_masks():
    torch.manual_seed(2)
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted order: 1, 3, 2, 0
    assert _sample_set(probs) == {0, 1, 2, 3}
    assert _sample_set(probs, top_k=2) == {1, 3}
    assert _sample_set(probs, top_k=-1) == {0, 1, 2, 3}
    assert _sample_set(probs, top_k=99) == {0, 1, 2, 3}  # k > vocab disables
    # mass before token 2 is 0.8 >= 0.75 -> dropped; before token 3 is 0.5 -> kept
    assert _sample_set(probs, top_p=0.75) == {1, 3}
    assert _sample_set(probs, top_p=0.85) == {1, 2, 3}
    # min_p relative to max prob 0.5: threshold 0.25 keeps 0.5, 0.3
    assert _sample_set(probs, min_p=0.5) == {1, 3}
    assert _sample_set(probs, min_p=0.2) == {1, 2, 3}
    # top-k then top-p on renormalised top-3 (0.5, 0.3, 0.15)/0.95: mass before 2 is 0.842
    assert _sample_set(probs, top_k=3, top_p=0.84) == {1, 3}


def test_mixed_batch_params_are_per_row():
    torch.manual_seed(3)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(3000, -1).contiguous()
    kinds = [dict(temperature=0.0), dict(top_k=2), dict(top_p=0.85), dict(min_p=0.5), dict()]
    params = [SamplingParams(**kinds[i % 5]) for i in range(3000)]
    out = sample(logits, params, [None] * 3000)
    seen = [set(out.token_ids[i::5]) for i in range(5)]
    assert seen == [{1}, {1, 3}, {1, 2, 3}, {1, 3}, {0, 1, 2, 3}]


def test_seeded_rows_independent_of_batch():
    V, steps = 50, 30
    torch.manual_seed(4)
    logits_steps = [torch.randn(6, V) for _ in range(steps)]
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=123)

    def run(row: int, batch: int, others_seeded: bool) -> list[int]:
        gens = [make_generator(1000 + i) if others_seeded else None for i in range(batch)]
        params = [SamplingParams(temperature=0.8) for _ in range(batch)]
        gens[row], params[row] = make_generator(sp.seed), sp
        toks = []
        for lg in logits_steps:
            batch_logits = torch.randn(batch, V)  # other rows' logits are unrelated
            batch_logits[row] = lg[0]
            toks.append(sample(batch_logits, params, gens).token_ids[row])
        return toks

    alone = run(0, 1, False)
    assert run(3, 5, False) == alone
    assert run(1, 4, True) == alone
    assert len(set(alone)) > 3  # it is actually sampling
    # A different seed gives a different stream.
    other = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    g = make_generator(124)
    assert [sample(lg[:1], [other], [g]).token_ids[0] for lg in logits_steps] != alone


def test_unseeded_distribution_matches_softmax():
    torch.manual_seed(5)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    T, N = 0.7, 40000
    out = _batch(logits.expand(N, -1).contiguous(), temperature=T)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    expected = torch.softmax(logits.double() / T, -1) * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts, expected)  # df=5: p(chi2 > 30) ~ 1.5e-5
    # Sanity that the test can tell: the un-tempered distribution is far off.
    wrong = torch.softmax(logits.double(), -1) * N
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 1000


def test_logprobs_are_raw_log_softmax_and_ranks():
    torch.manual_seed(6)
    logits = torch.randn(32, 80) * 2
    out = _batch(logits, temperature=0.5, top_k=10, top_p=0.9)
    raw = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, t].item(), abs=1e-5)
        assert out.ranks[i] == int((raw[i] > raw[i, t]).sum()) + 1
        assert 1 <= out.ranks[i] <= 10
    assert any(r > 1 for r in out.ranks)


def test_top_logprobs_sorted_and_per_row():
    torch.manual_seed(7)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(),
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=100, temperature=0),
    ]
    out = sample(logits, params, [None] * 4)
    top = out.top_logprobs
    assert top is not None and len(top) == 4
    assert top[1] == [] and top[2] == [] and len(top[0]) == 5 and len(top[3]) == 30
    raw = torch.log_softmax(logits, -1)
    for row, n in ((0, 5), (3, 30)):
        vals = [v for _, v in top[row]]
        assert vals == sorted(vals, reverse=True)
        assert [t for t, _ in top[row]] == raw[row].topk(n).indices.tolist()
        for t, v in top[row]:
            assert v == pytest.approx(raw[row, t].item(), abs=1e-6)
    assert top[3][0][0] == out.token_ids[3]


def test_float64_and_half_logits():
    torch.manual_seed(8)
    logits = torch.randn(8, 40, dtype=torch.float64) * 3
    out = _batch(logits, temperature=0.9, top_p=0.9, min_p=0.05, logprobs=3)
    raw = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[i], raw[i, t].item(), rel_tol=0, abs_tol=1e-12)
    assert _batch(logits, temperature=0).token_ids == logits.argmax(-1).tolist()
    half = logits.to(torch.bfloat16)
    assert _batch(half, temperature=0).token_ids == half.float().argmax(-1).tolist()
    assert len(_batch(half, top_k=5).token_ids) == 8


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sample(torch.zeros(5), [SamplingParams()], [None])
