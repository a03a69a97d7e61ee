"""Hand-made ensembles with known answers for pefttune.analysis.ensembles."""

import numpy as np
import pytest
import torch

from pefttune.analysis.ensembles import (
    ENSEMBLE_STRATEGIES,
    apply_selection,
    caruana_selection,
    ctc_frame_vote,
    ctc_posterior_average,
    majority_vote,
    rover_vote,
    soft_vote,
    weighted_vote,
)


# --------------------------------------------------------------------------- hard votes
def test_majority_vote_clear_majority():
    probs = np.array(
        [
            [[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]],
            [[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]],
            [[0.1, 0.9, 0.0], [0.2, 0.7, 0.1]],
        ]
    )
    np.testing.assert_array_equal(majority_vote(probs), [0, 2])


def test_majority_vote_tie_broken_by_summed_probability():
    # Member 0 votes 0, member 1 votes 1: 1-1 tie.  Summed probs 0.875 vs 1.125 -> class 1,
    # although the lowest member (0) voted 0.
    probs = np.array([[[0.5, 0.375, 0.125]], [[0.375, 0.75, 0.0]]])
    assert majority_vote(probs).tolist() == [1]


def test_majority_vote_tie_broken_by_lowest_member_index():
    # Sums are both exactly 1.0 -> the class of member 0 wins, whatever its class index.
    probs = np.array([[[0.25, 0.75]], [[0.75, 0.25]]])
    assert majority_vote(probs).tolist() == [1]
    assert majority_vote(probs[::-1]).tolist() == [0]


def test_majority_vote_only_tied_classes_and_float_tolerance():
    # Votes: 2, 2, 0, 0, 1 -> classes 0 and 2 tie (2 votes each); class 1 has the
    # largest probability mass but only one vote, so it is not a candidate.
    # Sums: c0 = 0.1+0.2+0.6+0.6+0 = 1.5; c2 = 0.6+0.5+0.3+0.1+0 = 1.5 up to
    # float rounding (0.1+0.2 != 0.3) -> still tied -> member 0 votes 2.
    probs = np.array(
        [
            [[0.1, 0.3, 0.6]],
            [[0.2, 0.3, 0.5]],
            [[0.6, 0.1, 0.3]],
            [[0.6, 0.3, 0.1]],
            [[0.0, 1.0, 0.0]],
        ]
    )
    assert majority_vote(probs).tolist() == [2]


def test_majority_vote_list_input_and_errors():
    members = [np.array([[0.2, 0.8]]), np.array([[0.9, 0.1]]), np.array([[0.3, 0.7]])]
    assert majority_vote(members).tolist() == [1]
    with pytest.raises(ValueError, match="at least one member"):
        majority_vote([])
    with pytest.raises(ValueError, match=r"probs\[1\] has vocabulary/class size 3"):
        majority_vote([np.zeros((2, 2)), np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"probs\[1\] has shape"):
        majority_vote([np.zeros((2, 2)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match="probabilities"):
        majority_vote(np.log(np.full((2, 1, 2), 0.5)))
    with pytest.raises(ValueError, match=r"probs must have shape \(M, N, C\)"):
        majority_vote(np.zeros((2, 2)))


def test_weighted_vote_changes_the_answer():
    # Members 0 and 1 vote class 0, member 2 votes class 1.
    probs = np.array([[[0.6, 0.4]], [[0.7, 0.3]], [[0.2, 0.8]]])
    assert majority_vote(probs).tolist() == [0]
    # 0.2 + 0.2 < 0.9 -> member 2 alone outweighs the other two.
    assert weighted_vote(probs, [0.2, 0.2, 0.9]).tolist() == [1]
    assert weighted_vote(probs, [0.5, 0.5, 0.9]).tolist() == [0]
    # Weights 1/6 + 2/6 vs 3/6 tie (up to rounding); summed probs c0 = 0.6+0.7+0.2 and
    # c1 = 0.4+0.3+0.8 are both 1.5 (up to rounding) -> member 0's class 0.
    assert weighted_vote(probs, [0.1, 0.2, 0.3]).tolist() == [0]


def test_weighted_vote_equal_weights_is_majority_vote():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(5, 50))
    np.testing.assert_array_equal(weighted_vote(probs, np.full(5, 0.7)), majority_vote(probs))


def test_weighted_vote_rejects_bad_weights():
    probs = np.full((2, 3, 2), 0.5)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        weighted_vote(probs, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_vote(probs, [1.0, -1.0])
    with pytest.raises(ValueError, match="all be zero"):
        weighted_vote(probs, [0.0, 0.0])


def test_soft_vote_differs_from_hard_vote():
    probs = np.array([[[0.5625, 0.4375]], [[0.5625, 0.4375]], [[0.0, 1.0]]])
    assert majority_vote(probs).tolist() == [0]
    pred, mean = soft_vote(probs)
    assert pred.tolist() == [1]
    np.testing.assert_allclose(mean, [[0.375, 0.625]])


# --------------------------------------------------------------------------- Caruana
def _caruana_dev():
    """3 members, 5 examples, 2 classes; r[m, n] = probability of the correct class.

    Singles: m0 = 3/5 (A, B, D right), m1 = 2/5 (C, C2), m2 = 0.
    Step 2 from {m0}: +m0 -> 3/5, +m1 -> mean r = [.625, .4375, .6875, .6875, .625] -> 4/5,
        +m2 -> 0.  Add m1.
    Step 3 from {m0, m1}: +m0 -> (2 r0 + r1)/3 = [.708, .542, .583, .583, .708] -> 5/5,
        +m1 -> B = (.75 + .25)/3 wrong -> 4/5, +m2 -> worse.  Add m0 again.
    Without replacement only m2 is left at step 3 and it does not improve -> stop.
    """
    #              A      B      C      C2     D
    r = np.array(
        [
            [0.875, 0.75, 0.375, 0.375, 0.875],
            [0.375, 0.125, 1.0, 1.0, 0.375],
            [0.0625, 0.0625, 0.0625, 0.0625, 0.0625],
        ]
    )
    y = np.array([1, 0, 1, 0, 1])
    probs = np.empty((3, 5, 2))
    probs[:, np.arange(5), y] = r
    probs[:, np.arange(5), 1 - y] = 1 - r
    return probs, y


def test_caruana_selection_known_subset_with_replacement():
    probs, y = _caruana_dev()
    assert caruana_selection(probs, y) == [0, 1, 0]
    assert caruana_selection(probs, y, max_size=10) == [0, 1, 0]  # stops: no improvement on 1.0
    assert caruana_selection(probs, y, max_size=2) == [0, 1]
    assert caruana_selection(probs, y, with_replacement=False) == [0, 1]
    ens = apply_selection(probs, [0, 1, 0])
    np.testing.assert_allclose(ens, (2 * probs[0] + probs[1]) / 3)
    assert (ens.argmax(-1) == y).all()


def test_caruana_selection_ties_and_custom_metric():
    probs, y = _caruana_dev()
    # Members 0 and 1 swapped: singles still favour the (now index-1) strong member.
    assert caruana_selection(probs[[1, 0, 2]], y) == [1, 0, 1]
    # Identical members tie everywhere -> lowest index, and never a strict improvement.
    same = np.stack([probs[0], probs[0]])
    assert caruana_selection(same, y) == [0]
    # A constant metric never improves -> only the initial (lowest-index) member.
    assert caruana_selection(probs, y, metric=lambda p, r: 0.5) == [0]


def test_caruana_selection_rejects_bad_input():
    probs, y = _caruana_dev()
    with pytest.raises(ValueError, match="dev_labels must have shape"):
        caruana_selection(probs, y[:3])
    with pytest.raises(ValueError, match="max_size"):
        caruana_selection(probs, y, max_size=0)
    with pytest.raises(ValueError, match="selected"):
        apply_selection(probs, [])
    with pytest.raises(ValueError, match="selected indices"):
        apply_selection(probs, [3])


# --------------------------------------------------------------------------- CTC
def _frames(labels, v=3, conf=0.75):
    """Probabilities (T, V) whose argmax per frame is ``labels`` (conf on the label)."""
    p = np.full((len(labels), v), (1 - conf) / (v - 1))
    p[np.arange(len(labels)), labels] = conf
    return p


def test_ctc_frame_vote_with_padding():
    t = 5
    # Example 0 (5 frames) member paths; vote per frame -> [1, 1, 0, 2, 2] -> [1, 2].
    ex0 = [[1, 1, 0, 2, 2], [1, 0, 0, 2, 0], [0, 1, 0, 1, 2]]
    # Example 1 (3 frames) -> votes [2, 0, 2] -> [2, 2]; the 2 padded frames hold NaN.
    ex1 = [[2, 0, 2], [2, 2, 0], [0, 0, 2]]
    lp = np.full((3, 2, t, 3), np.nan)
    for m in range(3):
        lp[m, 0] = np.log(_frames(ex0[m]))
        lp[m, 1, :3] = np.log(_frames(ex1[m]))
    assert ctc_frame_vote(lp, [5, 3]) == [[1, 2], [2, 2]]
    assert ctc_frame_vote(torch.tensor(lp, dtype=torch.float32), torch.tensor([5, 3])) == [[1, 2], [2, 2]]
    assert ctc_frame_vote(lp, [5, 0]) == [[1, 2], []]


def test_ctc_frame_vote_ties_and_posterior_average_differ():
    # Frame 0: m0 votes 1, m1 votes 0, summed posteriors 1.0 vs 1.0 -> member 0 -> label 1.
    # Frame 1: m0 votes 1, m1 votes 2, sums c1 = 0.5625 < c2 = 1.4375 -> label 2.
    m0 = np.array([[0.25, 0.75, 0.0], [0.0, 0.5625, 0.4375]])
    m1 = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]])
    with np.errstate(divide="ignore"):
        lp = np.log(np.stack([m0, m1]))[:, None]  # (M=2, N=1, T=2, V=3)
    assert ctc_frame_vote(lp, [2]) == [[1, 2]]
    assert ctc_frame_vote(lp[::-1], [2]) == [[2]]  # frame 0 now goes to member 0's blank
    # Averaged posteriors: frame 0 [.5, .5, 0] -> argmax tie -> blank 0; frame 1 -> 2.
    assert ctc_posterior_average(lp, [2]) == [[2]]


def test_ctc_posterior_average_vs_frame_vote():
    # Pattern X: two members weakly blank, one confidently token 1:
    # vote -> blank; mean posteriors [65/192, 94/192, 33/192] -> token 1.
    weak_blank = [0.5, 0.25, 0.25]
    sure_one = [1 / 64, 62 / 64, 1 / 64]
    x = [weak_blank, weak_blank, sure_one]
    blank = [[0.875, 0.0625, 0.0625]] * 3
    two = [[0.0625, 0.0625, 0.875]] * 3
    # Example 0 frames: X, blank, two, X.  Example 1: X, blank, then 2 NaN padded frames.
    post = np.full((3, 2, 4, 3), np.nan)
    for m in range(3):
        post[m, 0] = [x[m], blank[m], two[m], x[m]]
        post[m, 1, :2] = [x[m], blank[m]]
    lp = np.log(post)
    assert ctc_posterior_average(lp, [4, 2]) == [[1, 2, 1], [1]]
    assert ctc_frame_vote(lp, [4, 2]) == [[2], []]


def test_ctc_ensembles_reject_bad_input():
    lp = np.log(np.full((2, 1, 3, 4), 0.25))
    with pytest.raises(ValueError, match=r"log_probs\[1\] has vocabulary/class size 5"):
        ctc_frame_vote([lp[0], np.log(np.full((1, 3, 5), 0.2))], [3])
    with pytest.raises(ValueError, match="lengths"):
        ctc_posterior_average(lp, [4])
    with pytest.raises(ValueError, match="log-probabilities"):
        ctc_posterior_average(np.exp(lp), [3])  # probabilities instead of log-probs
    with pytest.raises(ValueError, match="blank"):
        ctc_frame_vote(lp, [3], blank=4)
    with pytest.raises(ValueError, match=r"log_probs must have shape \(M, N, T, V\)"):
        ctc_frame_vote(lp[0], [3])


# --------------------------------------------------------------------------- ROVER
def test_rover_insertions_and_deletions():
    # Slots: (1,1,1) (2,NULL,2) (NULL,NULL,4) (3,3,3) -> [1, 2, 3].
    assert rover_vote([[[1, 2, 3]], [[1, 3]], [[1, 2, 4, 3]]]) == [[1, 2, 3]]


def test_rover_several_examples():
    hyps = [
        [[1, 2, 3], [1, 2, 3], [1, 3], []],  # member 0
        [[1, 5, 3], [1, 3], [1, 2, 3], [5]],  # member 1
        [[1, 5, 3], [1, 3], [1, 2, 3], [5, 6]],  # member 2
    ]
    assert rover_vote(hyps) == [
        [1, 5, 3],  # substitution majority
        [1, 3],  # deletion majority: slot (2, NULL, NULL)
        [1, 2, 3],  # member 2 reuses member 1's inserted slot (NULL, 2) at zero cost
        [5],  # empty first member: slots (NULL,5,5) (NULL,NULL,6)
    ]


def test_rover_skipping_a_slot_with_null_is_free():
    # After [1, 3] and []: slots (1, NULL) (3, NULL).  [1] matches slot 1 (cost 0) and skips
    # slot 2 for free -> (1,NULL,1) (3,NULL,NULL) -> [1].
    assert rover_vote([[[1, 3]], [[]], [[1]]]) == [[1]]


def test_rover_ties_go_to_lowest_member():
    assert rover_vote([[[1, 2]], [[1, 3]]]) == [[1, 2]]
    assert rover_vote([[[1]], [[1, 2]]]) == [[1]]  # member 0's NULL wins the tie
    assert rover_vote([[[1, 2]], [[1]]]) == [[1, 2]]
    # [3] aligns against slot (2) (backtrace prefers token-vs-slot from the end), the
    # third [3] skips the NULL of slot (1, NULL) for free -> (1,N,N) (2,3,3) -> [3].
    assert rover_vote([[[1, 2]], [[3]], [[3]]]) == [[3]]
    assert rover_vote([[[np.int64(4)]], [np.array([4])]]) == [[4]]


def test_rover_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        rover_vote([])
    with pytest.raises(ValueError, match=r"hypotheses\[1\] has 1 examples"):
        rover_vote([[[1], [2]], [[1]]])


def test_strategy_names():
    assert list(ENSEMBLE_STRATEGIES) == [
        "vote",
        "weighted",
        "soft",
        "caruana",
        "frame_vote",
        "posterior_avg",
        "rover",
    ]
    assert ENSEMBLE_STRATEGIES["rover"] is rover_vote
