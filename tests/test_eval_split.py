"""fourbit.eval.calibration_split: calibration never sees a scored token, for any lengths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.eval import calibration_split


@settings(max_examples=60, deadline=None)
@given(calib=st.integers(1, 700), score=st.integers(2, 700), seq=st.integers(2, 600), extra=st.integers(0, 50))
def test_calibration_and_scored_tokens_are_disjoint(calib, score, seq, extra):
    ids = torch.arange(calib + score + extra)  # token value = its position
    windows, scored = calibration_split(ids, calib, score, seq)
    seen = torch.cat([w.reshape(-1) for w in windows])
    assert torch.equal(seen, torch.arange(calib))  # every calibration token once, in order
    assert torch.equal(scored, torch.arange(calib, calib + score))
    assert all(w.shape[0] == 1 and w.shape[1] <= seq for w in windows)


def test_readme_setting_scores_after_token_256():
    """The README's PTQ setting (256 calibration tokens, windows of 512): the old slicing calibrated on
    tokens 0-511, half of them scored; now one window of 256."""
    windows, scored = calibration_split(torch.arange(2000), 256, 1024, 512)
    assert [w.shape[1] for w in windows] == [256] and int(scored[0]) == 256 and scored.numel() == 1024
    with pytest.raises(ValueError, match="fewer than calib_tokens"):
        calibration_split(torch.arange(100), 256, 1024, 512)
