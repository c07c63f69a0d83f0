"""alignctl.train.session.build_optimizer: Adam/AdamW take torch's fused kernel unless the user chose
`fused` or `foreach`, and it takes the same step as the for-each kernel."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from alignctl.train.session import build_optimizer


def _recipe(**optimizer):
    return SimpleNamespace(weight_decay=0.1, lr=1e-2, optimizer={"_target_": "torch.optim.AdamW", **optimizer})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def test_adamw_runs_fused_unless_the_user_chose_a_kernel():
    assert build_optimizer(_model(), _recipe()).defaults["fused"] is True
    assert not build_optimizer(_model(), _recipe(foreach=True)).defaults["fused"]
    assert build_optimizer(_model(), _recipe(fused=False)).defaults["fused"] is False
    sgd = build_optimizer(_model(), SimpleNamespace(weight_decay=0.0, lr=0.1, optimizer={"_target_": "torch.optim.SGD"}))
    assert "fused" not in sgd.defaults or not sgd.defaults["fused"]


def test_the_fused_step_is_the_for_each_step():
    fused_model = _model()
    plain_model = copy.deepcopy(fused_model)
    fused, plain = build_optimizer(fused_model, _recipe()), build_optimizer(plain_model, _recipe(foreach=True))
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for mine, theirs in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did train
