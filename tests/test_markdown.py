"""How the report writes placements: runs of equal layers once, a missing placement as '-'."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pefttune.analysis.markdown import compact_placement, placement_runs


def test_runs_of_equal_layers_are_written_once():
    assert placement_runs("L0:lora L1:lora L2:bitfit") == [(0, 1, "lora"), (2, 2, "bitfit")]
    assert compact_placement("L0:lora L1:lora L2:bitfit") == "L0-1: lora; L2: bitfit"


@pytest.mark.parametrize("missing", [None, pd.NA, np.nan, ""])
def test_a_trial_without_a_placement_reads_as_a_dash(missing):
    # the log-mel reference has no layers: its placement_short is missing in the trials table
    assert placement_runs(missing) is None
    assert compact_placement(missing) == "-"
    column = pd.Series(["L0:lora L1:lora", missing], dtype="string" if missing is not np.nan else object)
    assert column.map(compact_placement).tolist() == ["L0-1: lora", "-"]
