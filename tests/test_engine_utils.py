"""The comparison helpers of tests/engine_utils.py fail on a truncated output (zip() alone would not)."""

import pytest

from remp.outputs import CompletionOutput, Logprob
from tests.engine_utils import assert_same_logprobs, assert_same_or_near_tie, assert_same_tokens


def test_same_tokens_names_the_first_difference_and_a_truncation():
    assert_same_tokens([1, 2, 3], (1, 2, 3))
    with pytest.raises(AssertionError, match="token 1 is 9, expected 2"):
        assert_same_tokens([1, 2, 3], [1, 9, 3])
    with pytest.raises(AssertionError, match="2 tokens where 3 were expected"):
        assert_same_tokens([1, 2, 3], [1, 2])
    with pytest.raises(AssertionError, match="4 tokens where 3"):
        assert_same_tokens([1, 2, 3], [1, 2, 3, 4])


def test_same_logprobs_counts_steps():
    step = {5: Logprob(-0.5, 1)}
    assert_same_logprobs([step, step], [step, {5: Logprob(-0.5 + 1e-12, 1)}])
    with pytest.raises(AssertionError, match="1 steps of logprobs, expected 2"):
        assert_same_logprobs([step, step], [step])
    with pytest.raises(AssertionError, match="step 0"):
        assert_same_logprobs([step], [{6: Logprob(-0.5, 1)}])


def test_near_tie_is_no_excuse_for_a_truncation():
    tie = {1: Logprob(-0.69, 1), 2: Logprob(-0.695, 2)}
    ref = CompletionOutput(0, "", [1, 1, 1], None, [tie] * 3)
    assert_same_or_near_tie(ref, CompletionOutput(0, "", [1, 2, 1], None, None))  # a near-tie at token 1
    with pytest.raises(AssertionError, match="2 tokens against the reference's 3"):
        assert_same_or_near_tie(ref, CompletionOutput(0, "", [1, 1], None, None))
