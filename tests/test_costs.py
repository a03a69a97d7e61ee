"""The equal-budget choice of the discrete search against DARTS (pefttune.analysis.costs)."""
from __future__ import annotations

import pandas as pd

from pefttune.analysis.costs import within_budget
from pefttune.analysis.tables import cost_arm, search_seed


def _searched(rows):
    return pd.DataFrame(rows, columns=["trial_id", "start_time", "time_total_s", "outcome", "best_dev_score"])


SEARCHED = _searched([
    ("late", 50.0, 10.0, "completed", 0.99),     # best dev of all, but started after the budget ran out
    ("first", 10.0, 30.0, "completed", 0.70),
    ("asha", 20.0, 15.0, "stopped_early", 0.95),  # counts against the budget, never chosen
    ("second", 30.0, 40.0, "completed", 0.80),
    ("third", 40.0, 50.0, "completed", 0.60),     # 30 + 15 + 40 + 50 = 135 > 100: left out
])


def test_within_budget_takes_the_start_order_prefix_and_the_best_completed_by_dev():
    pick = within_budget(SEARCHED, budget=100.0, mode="max")
    assert (pick.trial_id, pick.trials, pick.seconds) == ("second", 3, 85.0)
    # the trial after the first that does not fit is left out even where it would fit alone
    assert within_budget(SEARCHED, budget=130.0, mode="max").trial_id == "second"
    assert within_budget(SEARCHED, budget=1000.0, mode="max").trial_id == "late"
    assert within_budget(SEARCHED, budget=1000.0, mode="min").trial_id == "third"  # error rates: lower is better


def test_within_budget_without_a_completed_trial():
    assert within_budget(SEARCHED, budget=29.0, mode="max") == within_budget(SEARCHED.iloc[:0], 5.0, "max")
    pick = within_budget(SEARCHED[SEARCHED["outcome"] != "completed"], budget=100.0, mode="max")
    assert (pick.trial_id, pick.trials, pick.seconds) == (None, 1, 15.0)


def test_the_arm_of_a_trial():
    assert search_seed({"train": {"seeds": [3, 4, 5], "seed": 0}}) == 3 and search_seed({}) == 0
    assert cost_arm("discrete", None, 3, 3) == "discrete search" and cost_arm("discrete", None, 4, 3) == \
        "discrete replicates"
    assert cost_arm("uniform", "lora", 4, 3) == "uniform:lora" and cost_arm("darts-derived", None, 1, 3) == \
        "darts search + retrain"
    assert cost_arm("darts", None, 0, 3) == "darts search + retrain" and cost_arm("log-mel", None, 0, 0) == "log-mel"


def test_a_trial_that_continued_a_rung_counts_only_the_epochs_it_trained():
    from pefttune.analysis.tables import trained_epochs

    trials = pd.DataFrame({
        "trial_id": ["68bac_00000", "68bac_00001", "b847b_00000", "b847b_00001"],
        "epochs": [2, 2, 5, 5],
        "config/continues": [None, None, "/s/tune-lr/train_fn_68bac_00001/checkpoint_000001", None],
    })
    assert trained_epochs(trials).tolist() == [2.0, 2.0, 3.0, 5.0]  # the continued seed trained epochs 3-5
    assert trained_epochs(trials.drop(columns="config/continues")).tolist() == [2, 2, 5, 5]
