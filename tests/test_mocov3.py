"""MoCo v3: the loss against a NumPy transcription, the momentum encoder's role, the heads' structure."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import common
import mocov3


def np_ctr(q, k, tau, rank=0, all_keys=None):
    """NumPy transcription: CE(q K^T / tau, arange(N) + N * rank) * 2 tau, rows L2-normalised."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    keys = k if all_keys is None else all_keys
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    logits = q @ keys.T / tau
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    n = len(q)
    return -logp[np.arange(n), np.arange(n) + n * rank].mean() * 2 * tau


def test_contrastive_loss_matches_numpy():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for tau in (1.0, 0.2):
        got = mocov3.contrastive_loss(q, k, tau).item()
        assert got == pytest.approx(np_ctr(q.numpy(), k.numpy(), tau), rel=1e-5)
    # the 2 tau factor: dividing out 2 tau gives the plain cross-entropy
    plain = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(q) @ torch.nn.functional.normalize(k).T / 0.2, torch.arange(6))
    assert mocov3.contrastive_loss(q, k, 0.2).item() == pytest.approx(plain.item() * 0.4, rel=1e-5)


def test_contrastive_loss_rank_offset_labels(monkeypatch):
    """As rank 1 of 2: keys are gathered [rank0 keys; my keys] and my positives sit at N + i."""
    g = torch.Generator().manual_seed(1)
    q, k, other = (torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g),
                   torch.randn(4, 8, generator=g))
    other = torch.nn.functional.normalize(other, dim=1)  # rank 0 normalises its keys before the gather
    monkeypatch.setattr(common, "all_gather_nograd", lambda x: torch.cat([other, x]))
    monkeypatch.setattr(common, "get_rank", lambda: 1)
    got = mocov3.contrastive_loss(q, k, 0.5).item()
    all_keys = torch.cat([other, k]).numpy()
    assert got == pytest.approx(np_ctr(q.numpy(), k.numpy(), 0.5, rank=1, all_keys=all_keys), rel=1e-5)
    assert got != pytest.approx(np_ctr(q.numpy(), k.numpy(), 0.5, rank=0, all_keys=all_keys), rel=1e-3)


def small_model(**kw):
    args = mocov3.Args(arch="resnet18", img_size=32, mlp_dim=32, proj_dim=16, temperature=0.2, **kw)
    torch.manual_seed(0)
    return mocov3.MoCoV3(args)


def test_heads_follow_mocov3_rules():
    model = small_model()
    linears = [m for m in [*model.projector, *model.predictor] if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    # ResNet: last BN
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert isinstance(model.predictor[-1], nn.Linear)  # ResNet predictor: no last BN
    vit = mocov3.MoCoV3(mocov3.Args(arch="vit_small", img_size=32, mlp_dim=32, proj_dim=16))
    assert sum(isinstance(m, nn.Linear) for m in vit.projector) == 3  # ViT: 3-layer projector
    # ViT: last BN on both
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine


def test_momentum_encoder_gets_no_gradient_and_makes_the_keys():
    model = small_model()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    seen = []
    model.momentum_backbone.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    loss = model(x1, x2, 0.99)
    loss.backward()
    assert len(seen) == 2 and torch.equal(seen[0], x1) and torch.equal(seen[1], x2)
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_params())
    assert any(p.grad is not None for p in model.backbone.parameters())
    # the keys really come from the momentum encoder: perturbing it (and only it) changes the loss
    model.eval()  # fixed BN statistics so both forwards are comparable
    base = model(x1, x2, 1.0).item()
    with torch.no_grad():
        for p in model.momentum_projector.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert model(x1, x2, 1.0).item() != pytest.approx(base, rel=1e-4)


def test_momentum_update_happens_before_the_keys():
    """With m = 0 the momentum encoder becomes the online one before computing keys."""
    model = small_model()
    model.eval()
    with torch.no_grad():
        for p in model.momentum_params():
            p.add_(torch.randn_like(p))
        x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
        loss = model(x1, x2, 0.0).item()
        assert all(torch.equal(a, b) for a, b in zip(model.momentum_params(), model.online_params()))
        q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in (x1, x2))
        k1, k2 = (model.projector(model.backbone(x)) for x in (x1, x2))
        expected = mocov3.contrastive_loss(q1, k2, 0.2) + mocov3.contrastive_loss(q2, k1, 0.2)
    assert loss == pytest.approx(expected.item(), rel=1e-5)  # a sum of the two directions


def test_ema_update_values():
    t, o = [torch.full((3,), 2.0)], [torch.full((3,), 4.0)]
    common.ema_update(t, o, 0.9)
    assert torch.allclose(t[0], torch.full((3,), 0.9 * 2 + 0.1 * 4))


def test_backbone_pth_loads_into_plain_torchvision_resnet(tmp_path):
    out = str(tmp_path / "run")
    mocov3.main(["--synthetic-size", "16", "--img-size", "32", "--batch-size", "8", "--workers", "0",
                 "--max-steps", "1", "--knn-every", "0", "--mlp-dim", "32", "--output-dir", out])
    sd = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected  # all keys but fc.*
