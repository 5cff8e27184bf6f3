"""Penalties, logit bias and allowed-token masks in the sampler: vLLM's definitions against hand-computed values,
the same tokens on the native and the torch path, and a row's result independent of its batch-mates."""

import pickle

import numpy as np
import pytest
import torch

from remp import sampler
from remp.guided.bitmask import pack_allowed
from remp.guided.spec import GuidedSpec
from remp.penalties import Penalties, PenaltyHistory, apply_penalties
from remp.sampler import SampleRow, sample_rows
from remp.sampling_params import SamplingParams

V = 300
_SPEC = GuidedSpec("choice", '["x"]')  # the sampler only asks whether a request is guided: its mask says the rest


def row(p: SamplingParams | None = None, *, index: int = 0, banned=(), history=None, mask=None) -> SampleRow:
    return SampleRow.of(p or SamplingParams(), index, banned, history=history, mask=mask)


def test_penalties_as_vllm_defines_them():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    history = PenaltyHistory(prompt_ids=[0, 4, 0], output_ids=[1, 3, 3])
    apply_penalties(logits, [0], [history.wire(presence=0.25, frequency=0.5, repetition=2.0)])
    # repetition on prompt + output {0, 1, 3, 4}: positive / 2, negative * 2; then frequency 0.5 x count (1: once,
    # 3: twice); then presence 0.25 once for each output token (1, 3). Tokens 2 and 5 were never seen.
    want = [2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0 / 2 - 1.0 - 0.25, -2.0 * 2, 1.0]
    assert logits[0].tolist() == want


@pytest.mark.parametrize("kw", [{"presence": 0.7}, {"frequency": -0.3}, {"repetition": 1.3}])
def test_each_penalty_alone(kw):
    logits = torch.tensor([[1.5, -0.5, 2.0, 0.25]])
    p = dict(presence=0.0, frequency=0.0, repetition=1.0) | kw
    apply_penalties(logits, [0], [PenaltyHistory([2], [0, 0, 1]).wire(**p)])
    if "presence" in kw:  # output tokens 0 and 1, once each whatever their counts
        want = [1.5 - 0.7, -0.5 - 0.7, 2.0, 0.25]
    elif "frequency" in kw:  # a negative frequency penalty favours repeats: 0 twice, 1 once
        want = [1.5 + 0.3 * 2, -0.5 + 0.3, 2.0, 0.25]
    else:  # prompt token 2 counts too
        want = [1.5 / 1.3, -0.5 * 1.3, 2.0 / 1.3, 0.25]
    torch.testing.assert_close(logits[0], torch.tensor(want), rtol=0, atol=1e-7)


def test_penalty_history_is_rebuilt_from_tokens():
    rng = np.random.default_rng(0)
    prompt, output = rng.integers(0, 50, 40).tolist(), rng.integers(0, 80, 300).tolist()
    grown = PenaltyHistory(prompt)
    for t in output:
        grown.append(t)
    for a, b in zip(grown.wire(0.1, 0.2, 1.5), PenaltyHistory(prompt, output).wire(0.1, 0.2, 1.5)):
        assert np.array_equal(a, b)
    w = grown.wire(0.1, 0.2, 1.5)
    assert sorted(w.output_ids.tolist()) == sorted(set(output))
    assert dict(zip(w.output_ids.tolist(), w.output_counts.tolist())) == {t: output.count(t) for t in set(output)}
    assert sorted(w.seen_ids.tolist()) == sorted(set(prompt) | set(output))
    assert len(grown.wire(0.1, 0.2, 1.0).seen_ids) == 0  # no repetition penalty: the seen set stays home


def test_logit_bias_is_added_and_logprobs_stay_raw():
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    p = SamplingParams(temperature=0, logit_bias={7: 100.0, 8: -100.0}, logprobs=2)
    out = sample_rows(logits.clone(), [row(p), row(SamplingParams(temperature=0, logprobs=2))])
    assert out.token_ids[0] == 7
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(raw[0, 7].item(), abs=1e-6)  # before the bias, as vLLM's default
    assert out.ranks[0] == int((raw[0] > raw[0, 7]).sum()) + 1
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(2).indices.tolist()
    assert out.token_ids[1] == int(logits[1].argmax())


def test_penalised_row_samples_from_penalised_logits():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 3.0, 2.9
    p = SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=0)
    out = sample_rows(logits.clone(), [row(p, history=PenaltyHistory([5]))])
    assert out.token_ids == [6]  # 3.0 / 1.2 = 2.5 < 2.9
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[6].item(), abs=1e-6)


@pytest.mark.parametrize("native_path", [True, False])
@pytest.mark.parametrize(
    "kw",
    [{"temperature": 0}, {"temperature": 0.5}, {"temperature": 5.0}, {"top_k": 20, "top_p": 0.5}, {"min_p": 0.9}],
)
def test_a_mask_of_one_token_forces_it(monkeypatch, native_path, kw):
    if not native_path:
        monkeypatch.setattr(sampler.native, "available", lambda *_: False)
    torch.manual_seed(1)
    logits = torch.randn(8, V) * 5
    rows = [row(SamplingParams(**kw, seed=i, logprobs=1, guided=_SPEC), mask=pack_allowed([123], V)) for i in range(8)]
    out = sample_rows(logits, rows)
    assert out.token_ids == [123] * 8
    assert out.logprobs == [0.0] * 8  # logprobs see the mask, as vLLM's do
    assert [t[0][0] for t in out.top_logprobs] == [123] * 8


def test_masked_rows_sample_only_allowed_tokens():
    torch.manual_seed(2)
    allowed = [3, 50, 51, 299]
    rows = [row(SamplingParams(temperature=2.0, guided=_SPEC), mask=pack_allowed(allowed, V)) for _ in range(2000)]
    assert set(sample_rows(torch.randn(2000, V), rows).token_ids) == set(allowed)


def test_a_finished_grammar_outranks_min_tokens():
    eos, other = 2, 9
    only_eos = row(SamplingParams(guided=_SPEC), banned=(eos,), mask=pack_allowed([eos], V))
    both = row(SamplingParams(guided=_SPEC), banned=(eos,), mask=pack_allowed([eos, other], V))
    out = sample_rows(torch.randn(2, V), [only_eos, both])
    assert out.token_ids == [eos, other]


def test_mask_narrower_than_logits_allows_no_padding():
    logits = torch.zeros(1, V + 40)
    logits[0, V:] = 50.0  # the padding columns would win
    out = sample_rows(logits, [row(SamplingParams(temperature=0, guided=_SPEC), mask=pack_allowed([4, 5], V))])
    assert out.token_ids == [4]


def _mixed_rows(n: int, index: int) -> list[SampleRow]:
    """Rows with masks, bias, penalties, bans, seeds, native and torch paths, logprobs."""
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        kind = i % 5
        p = SamplingParams(
            temperature=[0.0, 0.8, 1.3, 0.6, 1.0][kind],
            top_k=40 if kind == 3 else 0,
            seed=100 + i,
            logprobs=[None, 2, 0, 3, None][kind],
            presence_penalty=0.5 if kind in (1, 4) else 0.0,
            frequency_penalty=0.3 if kind == 4 else 0.0,
            repetition_penalty=1.3 if kind in (2, 4) else 1.0,
            logit_bias={int(rng.integers(V)): 5.0} if kind in (0, 2) else None,
            guided=_SPEC if kind in (1, 2) else None,
        )
        history = PenaltyHistory(rng.integers(0, V, 30), rng.integers(0, V, 50)) if p.has_penalties else None
        mask = pack_allowed(rng.choice(V, 60, replace=False), V) if p.guided else None
        rows.append(row(p, index=index, banned=(1, 2) if kind == 3 else (), history=history, mask=mask))
    return rows


def test_native_and_torch_paths_agree_with_masks_and_penalties(monkeypatch):
    torch.manual_seed(3)
    for step in range(5):
        logits = torch.randn(10, V) * 3
        rows = _mixed_rows(10, step)
        fast = sample_rows(logits.clone(), rows)
        with monkeypatch.context() as m:
            m.setattr(sampler.native, "available", lambda *_: False)
            slow = sample_rows(logits.clone(), rows)
        assert fast.token_ids == slow.token_ids
        assert fast.ranks == slow.ranks
        torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(slow.logprobs), rtol=0, atol=1e-5)
        for i, r in enumerate(rows):
            if r.allowed is not None:
                assert r.allowed.view(np.uint32)[fast.token_ids[i] // 32] >> (fast.token_ids[i] % 32) & 1


def test_a_row_does_not_depend_on_its_batch_mates():
    torch.manual_seed(4)
    for step in range(5):
        rows = _mixed_rows(10, step)
        logits = torch.randn(10, V)
        alone = [sample_rows(logits[i : i + 1].clone(), [rows[i]]) for i in range(10)]
        together = sample_rows(logits.clone(), rows)
        order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]  # other batch-mates, another order
        shuffled = sample_rows(logits[order].clone(), [rows[i] for i in order])
        for i in range(10):
            if rows[i].seed is None:
                continue
            assert alone[i].token_ids[0] == together.token_ids[i] == shuffled.token_ids[order.index(i)]
            assert alone[i].logprobs[0] == together.logprobs[i] == shuffled.logprobs[order.index(i)]


def test_sample_row_of_and_its_wire_size():
    p = SamplingParams(guided=_SPEC, presence_penalty=0.5)
    vocab = 49152
    r = row(p, history=PenaltyHistory(range(1000), [5, 5, 6]), mask=pack_allowed([1, 2], vocab))
    assert r.penalties is not None and r.penalties.seen_ids.size == 0  # no repetition penalty: no seen set
    assert len(pickle.dumps(r)) < vocab // 8 + 1000  # the mask's bits and little else
    with pytest.raises(ValueError, match="PenaltyHistory"):
        row(p, mask=pack_allowed([1], vocab))
    with pytest.raises(ValueError, match="mask"):
        row(p, history=PenaltyHistory([]))
    with pytest.raises(ValueError, match="mask"):
        row(SamplingParams(), mask=pack_allowed([1], vocab))
    plain = row(SamplingParams(presence_penalty=0.0), history=PenaltyHistory([1]))
    assert plain.penalties is None and plain.allowed is None and plain.logit_bias == ()
    assert row(SamplingParams(logit_bias={"4": 1})).logit_bias == ((4, 1.0),)


def test_penalties_reject_out_of_vocabulary_history():
    with pytest.raises(ValueError, match="vocabulary"):
        apply_penalties(
            torch.zeros(1, 10),
            [0],
            [Penalties(0.0, 0.0, 2.0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.array([12], np.int32))],
        )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {1: "2"}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"guided": "json"}, "guided"),
    ],
)
def test_new_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        SamplingParams(**kwargs)


def test_params_penalty_defaults_and_vocab_check():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias, p.guided) == (
        0.0, 0.0, 1.0, None, None,
    )  # fmt: skip
    assert not p.has_penalties and SamplingParams(repetition_penalty=1.1).has_penalties
    SamplingParams(logit_bias={99: -100.0}).check_vocab(100)
    with pytest.raises(ValueError, match=r"logit_bias.*\[100\]"):
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
