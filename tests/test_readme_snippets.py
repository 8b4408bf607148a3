"""The README's "Use the loss in your own trainer" blocks run as written, on a plain CPU (the PyTorch references)
and under TRITON_INTERPRET=1 (the Triton kernels), each in a fresh process. Only the names the README says come from
the caller (a model, its inputs, advantages, old log-probs, masks) are defined before the block, on random data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
B, prompt_len, T = 2, 3, 6
input_ids = torch.randint(0, 131, (B, prompt_len + T))
completion_ids = input_ids[:, prompt_len:]
completion_mask = (torch.rand(B, T) > 0.2).long()
advantages = torch.randn(B, T)
with torch.no_grad():
    z_old = model(input_ids).logits[:, prompt_len - 1:-1]
old_logp = (torch.log_softmax(z_old.float() / 0.7, -1).gather(-1, completion_ids[..., None])[..., 0]
            + 0.3 * torch.randn(B, T))
# the hidden-states block
hidden = model.model(input_ids).last_hidden_state[:, prompt_len - 1:-1]
targets, A, old, mask, w = completion_ids, advantages, old_logp, completion_mask, torch.rand(B, T)
L = prompt_len + T          # the same tensors over every position of input_ids (causal_lm_policy_loss)
pad = lambda t, fill=0: torch.cat([torch.full((B, prompt_len - 1), fill, dtype=t.dtype), t,
                                   torch.full((B, 1), fill, dtype=t.dtype)], 1)
targets_full, A_full, old_full, mask_full = pad(completion_ids), pad(A), pad(old, -1.0), pad(completion_mask)
"""

CHECK = """
assert torch.isfinite(loss), loss
assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), metrics
print("README block ok")
"""


def _block(name):
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert m, f"README.md has no python block after <!-- snippet: {name} -->"
    return m.group(1)


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["plain-cpu", "triton-interpreter"])
def test_own_trainer_blocks_run_as_written(interpret, tmp_path):
    setup = SETUP + "\nfrom fastupg import Estimator\nest = Estimator.preset('grpo', eps_high=0.28)\n"
    code = "\n".join([SETUP, _block("own-logits"), CHECK, setup, _block("own-hidden"), CHECK])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret == "1":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("README block ok") == 2, r.stdout


def test_inplace_backward_refuses_a_view_with_a_clear_error():
    """A slice of model(...).logits is a view: autograd cannot return it overwritten beside the loss (it used to fail
    with an internal RuntimeError); the fused loss says what to do instead, naming inplace_backward."""
    import torch
    from fastupg.kernels import fused_policy_loss
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 5, 37, generator=g).requires_grad_()
    logits = (full * 1.5)[:, 1:]                      # non-leaf, and a view
    ids = torch.randint(0, 37, (2, 4), generator=g)
    with pytest.raises(ValueError, match="inplace_backward=True needs logits that are not a view"):
        fused_policy_loss(logits, ids, "grpo", advantages=torch.randn(2, 4, generator=g),
                          old_logp=-torch.rand(2, 4, generator=g), inplace_backward=True)
    loss, _ = fused_policy_loss(logits, ids, "grpo", advantages=torch.randn(2, 4, generator=g),
                                old_logp=-torch.rand(2, 4, generator=g))   # out of place: a view is fine
    loss.backward()
    assert torch.isfinite(full.grad).all() and full.grad.abs().sum() > 0
