"""fastupg.rollout.correction: truncated / masked importance sampling against a float64 loop reference."""
import math

import pytest
import torch

from fastupg.rollout.correction import IS_MODES, is_correction, is_correction_stats


def _reference_is(t, s, m, mode, cap):
    """Loop reference: TRL's definition written out per sequence."""
    B, T = t.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        seq = sum(float(t[b, j] - s[b, j]) for j in range(T) if m[b, j])
        for j in range(T):
            if not m[b, j]:
                continue
            r = math.exp(seq) if mode.startswith("sequence") else math.exp(float(t[b, j] - s[b, j]))
            w[b, j] = min(r, cap) if mode.endswith("truncate") else (r if r <= cap else 0.0)
    return w


def _random_case(seed, B, T, depth, spread, masked):
    """(trainer log-probs, engine log-probs, mask): engine log-probs in [-depth, 0], the trainer's off by
    N(0, spread), a fraction `masked` of tokens masked out."""
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(B, T, generator=g, dtype=torch.float64) * depth
    t = s + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    return t, s, torch.rand(B, T, generator=g) > masked


@pytest.mark.parametrize("mode", IS_MODES)
def test_is_correction_matches_reference(mode):
    B, T, cap = 5, 7, 1.5
    t, s, m = _random_case(1, B, T, depth=3, spread=0.4, masked=0.25)
    w = is_correction(t, s, m, mode=mode, cap=cap)
    ref = _reference_is(t, s, m, mode, cap)
    assert torch.allclose(w.double(), ref, rtol=1e-5, atol=1e-6)
    # mixes capped, masked and passed-through tokens, so the test can tell the modes apart
    if mode == "token_truncate":
        assert (w == cap).any() and ((w > 0) & (w < cap)).any()
    # packed layout with seq_ids gives the same weights
    flat = is_correction(t[m], s[m], torch.ones(int(m.sum()), dtype=torch.bool),
                         seq_ids=torch.arange(B).unsqueeze(1).expand(B, T)[m] * 10 + 3, mode=mode, cap=cap)
    assert torch.allclose(flat.double(), ref[m], rtol=1e-5, atol=1e-6)


def test_is_correction_no_grad_and_errors():
    t = torch.randn(2, 3, requires_grad=True)
    w = is_correction(t, torch.randn(2, 3), torch.ones(2, 3))
    assert not w.requires_grad
    huge = is_correction(torch.full((1, 2), 500.0), torch.zeros(1, 2), torch.ones(1, 2), mode="sequence_mask")
    assert torch.isfinite(huge).all() and (huge == 0).all()
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 3), torch.ones(2, 3), mode="token")
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        is_correction(t, torch.randn(2, 3), torch.ones(2, 3), cap=0)




@pytest.mark.parametrize("mode", IS_MODES)
def test_is_stats_match_reference(mode):
    B, T, cap = 6, 5, 1.5
    t, s, m = _random_case(2, B, T, depth=2, spread=0.8, masked=0.2)
    st = is_correction_stats(t.float(), s.float(), m, mode=mode, cap=cap)
    ref_w = _reference_is(t, s, m, mode, cap)
    # the raw ratio of each counted token, written out
    raw = []
    for b in range(B):
        seq = sum(float(t[b, j] - s[b, j]) for j in range(T) if m[b, j])
        raw += [math.exp(seq if mode.startswith("sequence") else float(t[b, j] - s[b, j])) for j in range(T) if m[b, j]]
    assert st["tokens"] == int(m.sum())
    assert st["ratio_sum"] == pytest.approx(float(ref_w[m].sum()), rel=1e-5)
    assert st["clipped"] == sum(r > cap for r in raw) and 0 < st["clipped"] < st["tokens"]
    d = (t - s).abs()[m]
    assert st["logp_diff_sum"] == pytest.approx(float(d.sum()), rel=1e-5)
    assert st["logp_diff_max"] == pytest.approx(float(d.max()), rel=1e-5)


def test_is_identical_logprobs_give_ratio_one():
    x = -torch.rand(3, 4)
    w = is_correction(x, x.clone(), torch.ones(3, 4), mode="sequence_truncate")
    assert torch.equal(w, torch.ones(3, 4))
    assert is_correction_stats(x, x.clone(), torch.ones(3, 4))["clipped"] == 0
