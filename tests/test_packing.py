"""Packing: bins respect the budget, and packed log-probs equal one-row-at-a-time log-probs
(position ids restart per row, so no token attends across rows)."""
import tempfile
from pathlib import Path

import pytest
import torch

from fastupg.data.packing import collate, pack, plan_bins


def _micro_model():
    from transformers import AutoModelForCausalLM
    from fastupg.task.tiny import ensure_embedded
    from fastupg.trainer import embedded_root
    root = ensure_embedded(embedded_root(str(Path(tempfile.gettempdir()) / "fastupg-test-emb"), "micro"),
                           seed=0, size="micro")
    m = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="sdpa")
    return m.eval()


def test_plan_bins_respects_budget_and_covers_every_row():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (50,), generator=g).tolist()
    bins = plan_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 2 * sum(lengths) // 64 + 1            # first-fit decreasing is never that wasteful
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        plan_bins([10, 70], 64)


def test_collate_targets_mask_and_positions():
    rows = [[5, 6, 7, 8], [9, 10, 11]]
    mb = collate(rows, [2, 1], [0, 1])
    assert mb.input_ids.tolist() == [[5, 6, 7, 9, 10]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert mb.targets.tolist() == [6, 7, 8, 10, 11]
    assert mb.loss_mask.tolist() == [False, True, True, True, True]
    assert mb.row_index.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="response_start"):
        collate([[1, 2]], [2], [0])


def _row_logps(model, mb):
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(-1, mb.targets[:, None]).squeeze(-1)


def test_packed_equals_unpacked_logprobs_on_tiny_model():
    model = _micro_model()
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    rows = [torch.randint(7, V, (int(n),), generator=g).tolist() for n in (9, 17, 5, 12)]
    starts = [3, 5, 2, 4]
    packed = pack(rows, starts, budget=64)
    assert len(packed) == 1 and packed[0].num_tokens == sum(len(r) - 1 for r in rows)
    lp = _row_logps(model, packed[0])
    for i, r in enumerate(rows):
        alone = _row_logps(model, collate(rows, starts, [i]))
        torch.testing.assert_close(lp[packed[0].row_index == i], alone, rtol=1e-5, atol=1e-5)


def test_no_attention_across_packed_rows():
    model = _micro_model()
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    rows = [torch.randint(7, V, (10,), generator=g).tolist() for _ in range(2)]
    base = _row_logps(model, collate(rows, [2, 2], [0, 1]))
    changed = [rows[0][:4] + [(t + 1) % V for t in rows[0][4:]], rows[1]]
    other = _row_logps(model, collate(changed, [2, 2], [0, 1]))
    second = torch.arange(18) >= 9
    torch.testing.assert_close(other[second], base[second])     # row 1 cannot see row 0
    assert not torch.allclose(other[~second], base[~second])    # but row 0 itself did change


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_through_the_trainer_path_do_not_attend_across_rows(attn):
    """The trainer's loss path (hf_loss, hidden states of response positions only) on a packed micro-batch equals
    each row run alone, for sdpa and eager. transformers builds the block-diagonal mask from the restarting
    position_ids (masking_utils.find_packed_sequence_indices, since 4.53.1: the lower bound in pyproject.toml);
    before that, sdpa ran one causal mask over the whole packed row and this test fails (checked below by
    running the same packed tokens with positions that do not restart: rows then see each other)."""
    from fastupg.trainer import token_logps
    model = _micro_model()
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    rows = [torch.randint(7, V, (int(n),), generator=g).tolist() for n in (11, 7, 14)]
    starts = [3, 2, 5]
    mb = collate(rows, starts, [0, 1, 2])
    with torch.no_grad():
        lp, ent = token_logps(model, mb, temperature=0.8)
        sel = mb.row_index[mb.loss_mask]
        for i in range(3):
            alone, ent_alone = token_logps(model, collate(rows, starts, [i]), temperature=0.8)
            torch.testing.assert_close(lp[sel == i], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent[sel == i], ent_alone, rtol=1e-5, atol=1e-5)
        # what older transformers did with packed rows: one causal mask over the whole row (forced here with an
        # all-ones 2-D attention_mask, which turns the packed-sequence detection off). Row 0 is unchanged, the
        # later rows see the earlier ones and their log-probs move: the comparison above would fail.
        from fastupg.models.hf_loss import causal_lm_logprobs
        lp_cross = causal_lm_logprobs(model, mb.input_ids, mb.targets[None], position_ids=mb.position_ids,
                                      attention_mask=torch.ones_like(mb.input_ids), temperature=0.8,
                                      select=mb.loss_mask[None], impl="chunked")
    torch.testing.assert_close(lp_cross[sel == 0], lp[sel == 0], rtol=1e-5, atol=1e-5)
    for i in (1, 2):
        assert not torch.allclose(lp_cross[sel == i], lp[sel == i], atol=1e-3)
