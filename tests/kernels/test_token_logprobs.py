"""token_logprobs (Triton, interpreter) vs a float64 log_softmax reference: values and both gradients."""
import pytest
import torch

from fastupg.kernels import token_logprobs
from fastupg.kernels.torch_reference import token_logprobs_ref

SMALL = 256  # vocabulary block: V=1000 gives 4 blocks with a masked tail


def _relerr(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_values_and_grads(dtype, tol, T):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 1000, generator=g) * 3).to(dtype)
    y = torch.randint(0, 1000, (3, 7), generator=g)
    gl, ge = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    z = logits.clone().requires_grad_()
    lp, ent = token_logprobs(z, y, T, return_entropy=True, block_v=SMALL)
    assert lp.dtype == torch.float32 and lp.shape == (3, 7)
    zr = logits.double().requires_grad_()
    lr, er = token_logprobs_ref(zr, y, T, return_entropy=True)
    assert _relerr(lp, lr) < 1e-5 and _relerr(ent, er) < 1e-5  # fp32 math on the same input values
    (lp * gl + ent * ge).sum().backward()
    (lr * gl + er * ge).sum().backward()
    assert _relerr(z.grad, zr.grad) < tol


def test_logp_only_strided_and_inplace():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 1100, generator=g) * 3
    logits = base[::2, :1000]  # non-contiguous rows, unit last stride
    y = torch.randint(0, 1000, (10,), generator=g)
    gl = torch.randn(10, generator=g)
    zr = logits.double().requires_grad_()
    (token_logprobs_ref(zr, y, 0.7) * gl).sum().backward()
    leaf = logits.clone().requires_grad_()
    buf = leaf * 1.0
    (token_logprobs(buf, y, 0.7, block_v=SMALL) * gl).sum().backward()
    assert _relerr(leaf.grad, zr.grad) < 1e-5
    leaf2 = base.clone().requires_grad_()
    view = (leaf2 * 1.0)[::2, :1000]
    lp = token_logprobs(view, y, 0.7, inplace_backward=True, block_v=SMALL)
    assert _relerr(lp, token_logprobs_ref(logits.double(), y, 0.7)) < 1e-5
    (lp * gl).sum().backward()
    assert _relerr(leaf2.grad[::2, :1000], zr.grad) < 1e-5
    assert bool((leaf2.grad[1::2] == 0).all())


def test_gpt2_vocab_default_block():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 50257, generator=g) * 2
    y = torch.randint(0, 50257, (2,), generator=g)
    lp, ent = token_logprobs(logits, y, 0.7, return_entropy=True)
    lr, er = token_logprobs_ref(logits.double(), y, 0.7, return_entropy=True)
    assert _relerr(lp, lr) < 1e-5 and _relerr(ent, er) < 1e-5


def test_bad_inputs():
    logits = torch.randn(4, 100)
    y = torch.randint(0, 100, (4,))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, torch.full((4,), 100))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, torch.full((4,), -1))
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(logits, y.float())
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, y, 0.0)
    bad = logits.clone()
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        token_logprobs(bad, y)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits = torch.randn(4, 100, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (4,))
    lp = token_logprobs(logits, y)  # reference path: float64 stays float64
    assert lp.dtype == torch.float64 and lp.requires_grad


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_inplace_backward_visible_to_autograd(path, monkeypatch):
    """The in-place gradient write bumps the logits' version counter (a second backward, or any other saved use,
    raises) and fastupg refuses the overwritten logits; honoured the same way on the plain-PyTorch path."""
    if path == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g)
    y = torch.randint(0, 300, (4,), generator=g)
    zr = logits.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(token_logprobs_ref(zr, y).sum(), zr)
    leaf = logits.clone().requires_grad_()
    z = leaf * 1.0
    lp = token_logprobs(z, y, inplace_backward=True, block_v=128)
    lp.sum().backward(retain_graph=True)
    assert _relerr(leaf.grad, grad_ref) < 1e-5 and _relerr(z.detach(), grad_ref) < 1e-5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()
    with pytest.raises(ValueError, match="overwritten"):
        token_logprobs(z, y)
    with pytest.raises(ValueError, match="leaf"):
        token_logprobs(logits.clone().requires_grad_(), y, inplace_backward=True)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_minus_inf_logits_give_finite_entropy_on_every_pytorch_path(impl, monkeypatch):
    """log_softmax_stats, the one log-softmax reference, adds 0 (not 0 * -inf = nan) for a banned token (-inf
    logit); the fused-linear PyTorch paths, which computed their own p log p before, now call it (a -inf bias entry
    gave a nan entropy there)."""
    from fastupg.kernels.fused_linear import fused_linear_logprobs
    from fastupg.kernels.torch_reference import log_softmax_stats
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the chunked impl's PyTorch chunks
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(37, 8, generator=g, dtype=torch.float64)
    bias = torch.zeros(37, dtype=torch.float64)
    bias[[3, 20]] = float("-inf")
    y = torch.randint(4, 20, (5,), generator=g)
    z = (h @ w.t() + bias) / 0.7
    keep = torch.isfinite(bias)
    lq = torch.log_softmax(z[:, keep], -1)  # the same distribution without the banned tokens
    want_ent = -(lq.exp() * lq).sum(-1)
    want_lp = torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]
    lp, _, ent = log_softmax_stats(z, y, return_entropy=True)
    assert _relerr(lp, want_lp) < 1e-12 and _relerr(ent, want_ent) < 1e-12
    lp, ent = fused_linear_logprobs(h, w, y, 0.7, return_entropy=True, bias=bias, impl=impl)
    assert _relerr(lp, want_lp) < 1e-12 and _relerr(ent, want_ent) < 1e-12
