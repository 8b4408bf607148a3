import pytest
import torch

from fastupg import advantages as adv
from fastupg.hpt import HPTConfig, keep_rows, route, success_rate

R = torch.tensor([1., 0., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def test_grpo_matches_hand_computation_and_zero_for_flat_groups():
    a = adv.grpo(R, G)
    g0 = R[:4]
    torch.testing.assert_close(a[:4], (g0 - g0.mean()) / (g0.std() + 1e-6))
    assert bool((a[4:] == 0).all())                      # all-0 and all-1 groups: no signal
    torch.testing.assert_close(adv.grpo(R, G, std=False)[:4], g0 - 0.75)


def test_mixed_uses_demonstrations_in_statistics():
    r = torch.tensor([0., 0., 0., 1.])                   # 3 failed rollouts + 1 demonstration (reward 1)
    g = torch.zeros(4, dtype=torch.long)
    on_only = adv.grpo(r, g, stats_mask=torch.tensor([1, 1, 1, 0]))
    assert bool((on_only == 0).all())                    # GRPO sees no signal
    m = adv.mixed(r, g)
    torch.testing.assert_close(m, (r - 0.25) / (r.std() + 1e-6))


def test_reinforce_rloo_gae():
    torch.testing.assert_close(adv.reinforce(R[:4]), torch.tensor([1., -1., 1., 1.]))
    with pytest.raises(ValueError, match="0/1"):
        adv.reinforce(torch.tensor([0.5]))
    rl = adv.rloo(R, G)
    torch.testing.assert_close(rl[:4], torch.tensor([1 - 2 / 3, 0 - 1, 1 - 2 / 3, 1 - 2 / 3]))
    rewards = torch.tensor([[0., 0., 1.]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    a, ret = adv.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    d2 = 1 - 0.1
    d1 = 0 + 0.9 * 0.1 - 0.2
    d0 = 0 + 0.9 * 0.2 - 0.5
    exp = torch.tensor([[d0 + 0.72 * (d1 + 0.72 * d2), d1 + 0.72 * d2, d2]])
    torch.testing.assert_close(a, exp)
    torch.testing.assert_close(ret, exp + values)


def test_bad_group_ids():
    with pytest.raises(ValueError, match="group_ids"):
        adv.grpo(R, G[:3])


@pytest.mark.parametrize("gate,alpha", [(0.0, [1., 0., 1.]), (0.5, [1., 0., 1.]), (0.8, [0., 0., 1.])])
def test_switch_routing(gate, alpha):
    P = success_rate(R, G)
    a, b = route(P, HPTConfig(mode="switch", gate=gate))
    assert a[::4].tolist() == alpha and (a + b == 1).all()


def test_soft_routing_and_keep_rows():
    P = torch.tensor([0.0, 0.25, 1.0])
    a, b = route(P, HPTConfig(mode="soft"))
    assert a.tolist() == [0.0, 0.25, 1.0] and b.tolist() == [1.0, 0.75, 0.0]
    assert keep_rows(a).tolist() == [1, 2] and keep_rows(b).tolist() == [0, 1]
    a, b = route(P, HPTConfig(mode="soft", alpha=lambda p: p ** 2, beta=lambda p: 1 - p ** 2))
    assert a.tolist() == [0.0, 0.0625, 1.0]


def test_bad_hpt_config():
    with pytest.raises(ValueError, match="HPTConfig.mode"):
        HPTConfig(mode="hard")
    with pytest.raises(ValueError, match="HPTConfig.gate"):
        HPTConfig(gate=1.5)
