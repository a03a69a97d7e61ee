"""Hand-computed checks for pefttune.metrics."""

import numpy as np
import pytest
import torch

from pefttune.metrics import (
    METRICS,
    accuracy,
    align_to_reference,
    cer,
    ctc_greedy_decode,
    edit_distance,
    edit_ops,
    error_rate,
    macro_f1,
    wer,
)


# --------------------------------------------------------------------------- classification
def test_accuracy_numpy_list_and_torch():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert accuracy(np.array(["a", "b"]), np.array(["a", "c"])) == 0.5
    assert accuracy(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        accuracy([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="pred must not be empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="pred must be a 1-D"):
        accuracy([[0, 1]], [[0, 1]])


PRED = [0, 0, 1, 1, 2, 2]
REF = [0, 1, 1, 1, 2, 0]
# class 0: TP=1 FP=1 FN=1 -> 2/4 = 1/2
# class 1: TP=2 FP=0 FN=1 -> 4/5
# class 2: TP=1 FP=1 FN=0 -> 2/3


def test_macro_f1_hand_computed():
    assert macro_f1(PRED, REF) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # 59/90


def test_macro_f1_labels_sklearn_semantics():
    # A listed class absent from pred and ref scores 0 (sklearn zero_division=0).
    assert macro_f1(PRED, REF, labels=[0, 1, 2, 3]) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4)
    # A subset averages over the listed classes only.
    assert macro_f1(PRED, REF, labels=[0, 1]) == pytest.approx((1 / 2 + 4 / 5) / 2)
    # Class absent from both pred and ref is excluded when labels=None.
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_macro_f1_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        macro_f1(PRED, REF, labels=[])
    with pytest.raises(ValueError, match="duplicates"):
        macro_f1(PRED, REF, labels=[0, 0])


# --------------------------------------------------------------------------- edit distance
def test_edit_distance_known_strings():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("sitting", "kitten") == 3
    assert edit_distance([], [1, 2]) == 2
    assert edit_distance([1, 2], []) == 2
    assert edit_distance([], []) == 0
    assert edit_distance("flaw", "lawn") == 2


def test_edit_ops_directions():
    # a = hypothesis, b = reference: deletions are reference tokens missing from a.
    assert edit_ops([1, 2, 3], [1, 2, 3, 4, 5]) == (0, 2, 0)
    assert edit_ops([1, 2, 3, 4, 5], [1, 2, 3]) == (0, 0, 2)
    assert edit_ops("the cat sit on mat".split(), "the cat sat on the mat".split()) == (1, 1, 0)
    # [1,2,3,4] vs [2,3,4,5]: cost 2 either as ins+del; 4 substitutions cost more.
    assert edit_ops([1, 2, 3, 4], [2, 3, 4, 5]) == (0, 1, 1)
    assert edit_ops(np.array([7, 8]), np.array([7, 8])) == (0, 0, 0)


def test_edit_ops_prefers_substitutions_on_cost_ties():
    # "ab" -> "ba": 2 substitutions or 1 deletion + 1 insertion; substitutions win.
    assert edit_ops("ab", "ba") == (2, 0, 0)
    # kitten -> sitting: k->s, e->i, +g
    assert edit_ops("sitting", "kitten") == (2, 0, 1)


def test_error_rate_wer_per_cer():
    hyps = ["the cat sit on mat", "hello world"]
    refs = ["the cat sat on the mat", "hello world"]
    assert wer(hyps, refs) == pytest.approx(2 / 8)
    # PER over phoneme lists: 1 substitution + 1 insertion over 6 reference phonemes.
    assert error_rate([["k", "a", "t"], ["d", "o", "x", "g"]], [["k", "ae", "t"], ["d", "o", "g"]]) == 2 / 6
    assert error_rate([[1, 2]], [[1, 2, 3, 4]]) == 0.5
    # Insertions can push the rate above 1.
    assert wer(["a b c"], ["a"]) == 2.0
    # CER: whitespace normalised, single spaces count as characters.
    assert cer(["ab  cd "], ["ab ce"]) == pytest.approx(1 / 5)
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)


def test_error_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        error_rate([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="refs contain no tokens"):
        error_rate([[1]], [[]])
    with pytest.raises(ValueError, match="not a single str"):
        wer("hello world", "hello world")
    with pytest.raises(ValueError, match="refs must not be empty"):
        error_rate([], [])


# --------------------------------------------------------------------------- CTC
def _onehot_logprobs(path, v):
    """Log-posteriors whose argmax follows ``path`` (0.7 on the label, rest shared)."""
    p = np.full((len(path), v), 0.3 / (v - 1))
    p[np.arange(len(path)), path] = 0.7
    return np.log(p)


def test_ctc_greedy_decode_collapses_repeats_and_blanks():
    lp = _onehot_logprobs([0, 1, 1, 0, 1, 2, 2, 0, 0, 3], 4)
    assert ctc_greedy_decode(lp) == [[1, 1, 2, 3]]


def test_ctc_greedy_decode_batch_lengths_and_torch():
    a = _onehot_logprobs([1, 1, 2, 0, 2], 3)
    b = _onehot_logprobs([2, 0, 0, 1, 1], 3)  # only 3 frames valid -> [2]
    batch = np.stack([a, b])
    assert ctc_greedy_decode(batch, lengths=[5, 3]) == [[1, 2, 2], [2]]
    assert ctc_greedy_decode(torch.tensor(batch), lengths=torch.tensor([5, 3])) == [[1, 2, 2], [2]]
    assert ctc_greedy_decode(torch.tensor(batch, dtype=torch.bfloat16), lengths=[5, 0]) == [[1, 2, 2], []]


def test_ctc_greedy_decode_nonzero_blank():
    lp = _onehot_logprobs([3, 1, 3, 1, 1, 0], 4)
    assert ctc_greedy_decode(lp, blank=3) == [[1, 1, 0]]


def test_ctc_greedy_decode_rejects_bad_input():
    lp = _onehot_logprobs([0, 1], 3)
    with pytest.raises(ValueError, match="lengths"):
        ctc_greedy_decode(lp[None], lengths=[3])
    with pytest.raises(ValueError, match="lengths must have shape"):
        ctc_greedy_decode(lp[None], lengths=[1, 2])
    with pytest.raises(ValueError, match="blank"):
        ctc_greedy_decode(lp, blank=3)
    with pytest.raises(ValueError, match="log_probs must have shape"):
        ctc_greedy_decode(np.zeros(4))


def test_metrics_registry_modes():
    assert {k: mode for k, (_, mode) in METRICS.items()} == {
        "accuracy": "max",
        "macro_f1": "max",
        "per": "min",
        "wer": "min",
        "cer": "min",
    }
    fn, _ = METRICS["per"]
    assert fn([[1, 2]], [[1, 3]]) == 0.5


def test_align_to_reference_marks_substitutions_and_deletions():
    assert align_to_reference([1, 2, 3], [1, 2, 3]) == [1, 2, 3]
    assert align_to_reference([1, 3], [1, 2, 3]) == [1, None, 3]  # 2 deleted
    assert align_to_reference([1, 9, 2, 3], [1, 2, 3]) == [1, 2, 3]  # the insertion 9 is left out
    assert align_to_reference([1, 7, 3], [1, 2, 3]) == [1, 7, 3]  # substitution
    assert align_to_reference([], [4, 5]) == [None, None] and align_to_reference([4], []) == []
    # S=1, D=1 (most substitutions, not 0 + 2 deletions + 1 insertion); either place of the gap is optimal
    assert align_to_reference(["a", "x"], ["a", "b", "c"]) in (["a", "x", None], ["a", None, "x"])
    rng = np.random.default_rng(0)
    for _ in range(300):  # the alignment is one of edit_ops': its mismatches are S + D, its gaps D
        ref = list(rng.integers(1, 5, rng.integers(0, 9)))
        hyp = list(rng.integers(1, 5, rng.integers(0, 9)))
        s, d, _ = edit_ops(hyp, ref)
        aligned = align_to_reference(hyp, ref)
        assert len(aligned) == len(ref)
        assert sum(x != r for x, r in zip(aligned, ref)) == s + d and aligned.count(None) == d
