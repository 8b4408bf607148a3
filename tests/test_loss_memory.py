"""The trainer's loss step never creates a vocabulary-sized tensor per token: with a vocabulary much larger than the
token count, the largest tensor produced during forward + backward of every micro-batch (policy and reference model)
stays far below tokens x vocab (the N x V logits), and only response positions reach the lm_head."""
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastupg import distributed as D
from fastupg import trainer as T
from fastupg.config import TrainConfig

EMB = str(Path(tempfile.gettempdir()) / "fastupg-test-emb")
V_BIG = 50_000


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                n = t.untyped_storage().nbytes()
                if n > self.bytes:
                    self.bytes, self.op = n, str(func)
        return out


def _big_vocab_model(seed):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V_BIG, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).float()


def _loss_step(tmp_path, monkeypatch, **kw):
    cfg = TrainConfig(model="embedded", model_size="micro", embedded_dir=EMB, loss_type="hpt", hpt_mode="soft",
                      num_generations=2, per_device_train_batch_size=4, max_completion_length=32, beta=0.1,
                      max_tokens_per_microbatch=128, loss_chunk_mb=1, report_to=(), plot=False, progress_bar=False,
                      save_steps=0, output_dir=str(tmp_path / "run"), seed=3, **kw)
    tr = T.Trainer(cfg, D.DistInfo())
    tr.score = lambda texts, golds: [float(i % 2) for i in range(len(texts))]
    rows, _ = tr.build_rows(tr.next_prompts())          # rollouts from the embedded model (token ids < 262)
    kept = rows.select(torch.arange(len(rows.ids)))
    mbs = T.micro_batches(kept, cfg.max_tokens_per_microbatch, T.token_weigher(tr.est, cfg, kept, tr.info))
    tr.model = tr.loss.model = _big_vocab_model(0)
    tr.ref_model = tr.loss.ref_model = _big_vocab_model(1).requires_grad_(False)
    resp = [int(mb.packed.loss_mask.sum()) for mb in mbs]
    import fastupg.models.hf_loss as H
    head_rows, real = [], H.fused_linear_logprobs
    monkeypatch.setattr(H, "fused_linear_logprobs", lambda h, *a, **k: head_rows.append(h.shape[0]) or real(h, *a, **k))
    rec = LargestTensor()
    with rec:
        acc, _ = tr.loss.run(mbs, len(mbs), None, grad=True)
    assert tr.model.get_output_embeddings().weight.grad is not None and acc["ntok"] == sum(resp)
    assert head_rows == [n for n in resp for _ in (0, 1)]     # policy + reference: response positions only
    return rec, resp


def test_no_vocabulary_sized_tensor_in_the_loss_step(tmp_path, monkeypatch):
    rec, resp = _loss_step(tmp_path, monkeypatch)
    assert len(resp) >= 2 and min(resp) > 4 * 8      # tokens per micro-batch >> hidden size: N x V >> V x D
    # what may remain: the lm_head weight and its gradient (V x D fp32) and one 1 MiB chunk of logits (loss_chunk_mb)
    allowed = max(V_BIG * 8 * 4, 2 ** 20)
    smallest_logits = 4 * V_BIG * min(resp)              # fp32 logits of the smallest micro-batch's response tokens
    assert rec.bytes <= allowed < smallest_logits // 2, (rec.bytes, rec.op, smallest_logits)


def test_the_recorder_sees_logits_when_they_exist(tmp_path, monkeypatch):
    """The same step through the plain reference (use_fused_loss=false) does create them: the test above can fail."""
    rec, resp = _loss_step(tmp_path, monkeypatch, use_fused_loss=False)
    assert rec.bytes >= 4 * V_BIG * min(resp), (rec.bytes, rec.op)
