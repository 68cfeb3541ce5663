"""DenseCL: correspondence, dense loss vs NumPy and vs the earlier concatenating version (fp32, bf16, memory),
(1 - lambda)/lambda weighting, the two queues, momentum keys, shuffle-BN (one process; across ranks in
test_distributed.py), resume of queues and pointers, DenseCL-specific bad input."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import densecl  # noqa: E402

TINY_DCL = ["--data", "synthetic", "--synthetic-size", "64", "--img-size", "32", "--batch-size", "8",
            "--workers", "0", "--log-every", "1", "--knn-every", "0", "--mlp-dim", "64", "--stem", "small",
            "--queue-size", "64"]


def small_model(seed=0, **kw):
    args = densecl.Args(**{**dict(arch="resnet18", stem="small", img_size=32, mlp_dim=32, proj_dim=16,
                                  queue_size=16, shuffle_splits=2), **kw})
    torch.manual_seed(seed)
    return densecl.DenseCL(args)


def synthetic_batch(n, px=32):
    """n synthetic images (real structure, unlike noise) as a normalised batch [n, 3, px, px]."""
    tf = common.eval_transform(px)
    return torch.stack([tf(common.render_synthetic(0, i)[0]) for i in range(n)])


def np_infonce(q, pos, queue, tau):
    """NumPy: rows q [M, D] (normalised here), positives pos [M, D] (normalised here), queue [K, D];
    CE at 0."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    pos = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    logits = np.concatenate([(q * pos).sum(1, keepdims=True), q @ queue.T], 1) / tau
    logits -= logits.max(1, keepdims=True)
    return -(logits[:, 0] - np.log(np.exp(logits).sum(1))).mean()


# ---------------------------------------------------------------------------- correspondence


def test_identical_views_match_identity():
    model = small_model().eval()
    x = synthetic_batch(4)
    with torch.no_grad():
        fq, fk = (common.feature_map(model.backbone, x),  # [4, 512, 4, 4]
                  common.feature_map(model.momentum_backbone, x))
    match = densecl.match_locations(fq, fk)
    assert match.shape == (4, 16) and match.dtype == torch.long
    assert (match == torch.arange(16)).float().mean() >= 0.95


def test_match_follows_a_known_permutation_query_to_key():
    g = torch.Generator().manual_seed(0)
    fq = torch.randn(3, 8, 5, 5, generator=g)  # [N, C, S, S]
    perm = torch.randperm(25, generator=g)
    fk = torch.empty(3, 8, 25)
    # key location perm[i] holds query location i (scaled: cosine ignores it)
    fk[:, :, perm] = fq.flatten(2) * 3.0
    match = densecl.match_locations(fq, fk.view(3, 8, 5, 5))
    # query i -> key perm[i]; key -> query would give argsort(perm)
    assert torch.equal(match, perm.expand(3, -1))
    assert not torch.equal(perm, torch.argsort(perm))


# ---------------------------------------------------------------------------- losses


def test_dense_loss_matches_numpy():
    g = torch.Generator().manual_seed(1)
    n, d, s2, k = 3, 6, 9, 10
    q, kd = torch.randn(n, d, s2, generator=g), torch.randn(n, d, s2, generator=g)
    match = torch.randint(0, s2, (n, s2), generator=g)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    got = densecl.dense_loss(q, kd, match, queue, 0.2).item()
    qn, kn, m = q.numpy(), kd.numpy(), match.numpy()
    rows, pos = [], []
    for i in range(n):
        for j in range(s2):  # every query location, positive = the key vector at its matched location
            rows.append(qn[i, :, j])
            pos.append(kn[i, :, m[i, j]])
    assert got == pytest.approx(np_infonce(np.array(rows), np.array(pos), queue.numpy(), 0.2), rel=1e-5)
    # the positive really is the matched location: another match gives another loss
    other = densecl.dense_loss(q, kd, (match + 1) % s2, queue, 0.2).item()
    assert other != pytest.approx(got, rel=1e-3)


def test_global_loss_matches_numpy():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    got = densecl.global_loss(q, k, queue, 0.2).item()
    assert got == pytest.approx(np_infonce(q.numpy(), k.numpy(), queue.numpy(), 0.2), rel=1e-5)


def concat_dense_loss(q_dense, k_dense, match, queue, temperature):
    """Reference: densecl.dense_loss as it was: fp32 logits, positive and negatives concatenated."""
    q, k = F.normalize(q_dense.float(), dim=1), F.normalize(k_dense.float(), dim=1)  # [N, D, S^2]
    k_pos = torch.gather(k, 2, match[:, None].expand(-1, k.shape[1], -1))  # [N, D, S^2]
    l_pos = (q * k_pos).sum(1).reshape(-1, 1)  # [N * S^2, 1]
    q = q.transpose(1, 2).reshape(-1, q.shape[1])  # [N * S^2, D]
    l_neg = (q @ queue.T).float()  # [N * S^2, K]
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # [N * S^2, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def concat_global_loss(q, k, queue, temperature):
    """Reference: densecl.global_loss as it was."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)  # [N, D]
    l_pos = (q * k).sum(1, keepdim=True)  # [N, 1]
    l_neg = (q @ queue.T).float()  # [N, K]
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # [N, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def dense_case(seed=3, n=6, d=32, s2=9, k=300):
    """Dense-loss inputs whose queue holds noisy copies of query locations, so that logits spread over
    [-1/tau, 1/tau] as in training (a random queue gives logits near 0, where bf16 rounding hides)."""
    g = torch.Generator().manual_seed(seed)
    q, kd = torch.randn(n, d, s2, generator=g), torch.randn(n, d, s2, generator=g)  # [N, D, S^2]
    match = torch.randint(0, s2, (n, s2), generator=g)  # [N, S^2]
    rows = F.normalize(q, dim=1).transpose(1, 2).reshape(-1, d)  # [N * S^2, D]
    noise = 0.3 * torch.randn(k, d, generator=g) / d ** 0.5  # [K, D]; |noise| ~ 0.3 of a unit row
    queue = F.normalize(rows[torch.randint(0, len(rows), (k,), generator=g)] + noise, dim=1)  # [K, D]
    return q, kd, match, queue


def value_and_grad(loss_fn, q, *rest, bf16=False):
    q = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(q, *rest, 0.2)
    loss.backward()
    return loss.detach(), q.grad


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dense_loss_equals_the_concatenating_reference_fp32():
    q, kd, match, queue = dense_case()
    got, got_g = value_and_grad(densecl.dense_loss, q, kd, match, queue)
    want, want_g = value_and_grad(concat_dense_loss, q, kd, match, queue)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-8)


def test_dense_loss_in_row_chunks_equals_one_chunk_under_bf16(monkeypatch):
    q, kd, match, queue = dense_case()
    whole, whole_g = value_and_grad(densecl.dense_loss, q, kd, match, queue, bf16=True)
    monkeypatch.setattr(densecl, "LSE_CHUNK", 8 * 300)  # 54 rows of 300 logits: 7 chunks, the last one short
    got, got_g = value_and_grad(densecl.dense_loss, q, kd, match, queue, bf16=True)
    assert got.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(got_g, whole_g, rtol=1e-5, atol=1e-8)


def test_dense_loss_under_bf16_autocast_as_close_to_fp32_as_the_reference(monkeypatch):
    # bf16 logits carry ~3 significant digits: on such cases both versions land ~1e-4 (value, relative) and
    # ~1.3e-3 (gradient, relative norm) from fp32, and as far from each other. Tolerances: 3e-4 and 5e-3.
    monkeypatch.setattr(densecl, "LSE_CHUNK", 8 * 300)
    q, kd, match, queue = dense_case()
    fp32, fp32_g = value_and_grad(concat_dense_loss, q, kd, match, queue)
    for fn in (densecl.dense_loss, concat_dense_loss):
        v, g = value_and_grad(fn, q, kd, match, queue, bf16=True)
        assert v.dtype == torch.float32 and v.item() == pytest.approx(fp32.item(), rel=3e-4)
        assert rel(g, fp32_g) < 5e-3
    new, new_g = value_and_grad(densecl.dense_loss, q, kd, match, queue, bf16=True)
    old, old_g = value_and_grad(concat_dense_loss, q, kd, match, queue, bf16=True)
    assert new.item() == pytest.approx(old.item(), rel=3e-4) and rel(new_g, old_g) < 5e-3


def test_dense_loss_under_bf16_never_holds_the_logits_in_fp32(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFp32(TorchDispatchMode):  # the largest fp32 tensor any op returns
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFp32.numel = max(LargestFp32.numel, t.numel())
            return out

    monkeypatch.setattr(densecl, "LSE_CHUNK", 8 * 300, raising=False)
    q, kd, match, queue = dense_case()
    saved = []
    with LargestFp32(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value_and_grad(densecl.dense_loss, q, kd, match, queue, bf16=True)
    m, k = q.shape[0] * q.shape[2], len(queue)
    assert any(t.shape == (m, k) and t.dtype == torch.bfloat16 for t in saved)  # the logits, kept in bf16
    assert not any(t.dtype == torch.float32 and t.numel() >= m * k for t in saved)
    assert LargestFp32.numel <= max(8 * k, queue.numel())  # fp32: the inputs, and chunks of 8 rows of logits


def test_row_logsumexp_accumulates_bf16_logits_in_fp32(monkeypatch):
    monkeypatch.setattr(densecl, "LSE_CHUNK", 4 * 4096)
    g = torch.Generator().manual_seed(4)
    x = (10 * torch.rand(10, 4096, generator=g) - 5).bfloat16().requires_grad_()  # [M, K], logits in [-5, 5]
    w = torch.rand(10, generator=g)  # [M] an upstream gradient
    out = densecl.RowLogSumExp.apply(x)  # [M]
    (out * w).sum().backward()
    want = torch.logsumexp(x.detach().double(), 1)  # [M]
    assert out.dtype == torch.float32 and (out.double() - want).abs().max() < 1e-5  # bf16 output: ~0.03 off
    softmax = torch.softmax(x.detach().double(), 1) * w[:, None]  # [M, K]
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), softmax, rtol=1e-2, atol=0)  # bf16 rounding of each entry


def test_global_loss_equals_the_concatenating_reference():
    q, kd, _, queue = dense_case(seed=5, n=40, s2=1)
    q, k = q[:, :, 0], kd[:, :, 0]  # [N, D]
    for bf16, value_tol, grad_tol in ((False, 1e-6, 1e-5), (True, 3e-4, 5e-3)):  # bf16: see the dense loss
        got, got_g = value_and_grad(densecl.global_loss, q, k, queue, bf16=bf16)
        want, want_g = value_and_grad(concat_global_loss, q, k, queue, bf16=bf16)
        assert got.item() == pytest.approx(want.item(), rel=value_tol) and rel(got_g, want_g) < grad_tol


def test_total_is_one_minus_lambda_global_plus_lambda_dense():
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    for lam in (0.5, 0.3):
        model = small_model()
        loss, parts = model(x1, x2, 0.999, lam)
        # else a swap hides
        assert parts["loss_global"].item() != pytest.approx(parts["loss_dense"].item(), rel=1e-3)
        want = (1 - lam) * parts["loss_global"] + lam * parts["loss_dense"]
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # gradients follow the weights: lambda 0 -> nothing reaches the dense head, lambda 1 -> nothing the
    # global head
    for lam, silent, active in ((0.0, "dense_head", "global_head"), (1.0, "global_head", "dense_head")):
        model = small_model()
        model(x1, x2, 0.999, lam)[0].backward()
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in getattr(model, silent).parameters())
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in getattr(model, active).parameters())


def test_dense_weight_warmup_and_zero_weight_is_plain_mocov2():
    assert [densecl.dense_lambda(s, 0.5, 3) for s in range(5)] == [0, 0, 0, 0.5, 0.5]
    assert densecl.dense_lambda(0, 0.5, 0) == 0.5
    model = small_model(dense_weight=0.0)  # the dense branch is not built at all
    assert (model.dense_head is None and model.momentum_dense_head is None
            and not hasattr(model, "dense_queue"))
    loss, parts = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.999, 0.0)
    assert set(parts) == {"loss_global"} and loss.item() == pytest.approx(parts["loss_global"].item())


# ---------------------------------------------------------------------------- queues and the momentum encoder


def direct_keys(model, x, momentum=True):
    """Keys computed by hand: (global [n, D], pooled dense [n, D]) L2-normalised, BN in eval mode."""
    net, gh, dh = ((model.momentum_backbone, model.momentum_global_head, model.momentum_dense_head)
                   if momentum else (model.backbone, model.global_head, model.dense_head))
    with torch.no_grad():
        f = common.feature_map(net, x)  # [n, C, S, S]
        return F.normalize(gh(f.mean((2, 3))), dim=1), F.normalize(dh(f).flatten(2).mean(2), dim=1)


def test_queues_hold_momentum_keys_pooled_dense_keys_and_wrap():
    # eval: BN on running stats, so hand-computed keys are comparable
    model = small_model(queue_size=8).eval()
    with torch.no_grad():  # make the online encoder differ from the momentum one (they start as copies)
        for p in model.online_params():
            p.add_(0.05 * torch.randn_like(p))
    xs = [synthetic_batch(8)[i * 4:(i + 1) * 4] for i in range(2)] + [torch.randn(4, 3, 32, 32)]
    keys = []
    for i, x in enumerate(xs):
        model(torch.randn(4, 3, 32, 32), x, 1.0, 0.5)  # m = 1: the momentum encoder stays as it is
        keys.append(direct_keys(model, x))
        assert int(model.queue_ptr) == int(model.dense_queue_ptr) == [4, 0, 4][i]  # K = 8 = 2 batches: wraps
    g_keys, d_keys = zip(*keys)
    torch.testing.assert_close(model.queue, torch.cat([g_keys[2], g_keys[1]]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.dense_queue, torch.cat([d_keys[2], d_keys[1]]), atol=1e-5, rtol=1e-4)
    # the dense queue is not the global keys, nor the dense keys pooled *after* L2 normalisation
    assert not torch.allclose(model.dense_queue[:4], g_keys[2], atol=1e-3)
    with torch.no_grad():
        f = common.feature_map(model.momentum_backbone, xs[2])
        after = F.normalize(F.normalize(model.momentum_dense_head(f).flatten(2), dim=1).mean(2), dim=1)
    assert not torch.allclose(model.dense_queue[:4], after, atol=1e-4)
    # keys come from the momentum encoder: the online encoder's keys are different
    g_on, d_on = direct_keys(model, xs[2], momentum=False)
    assert not torch.allclose(model.queue[:4], g_on, atol=1e-3)
    assert not torch.allclose(model.dense_queue[:4], d_on, atol=1e-3)


def test_momentum_update_precedes_keys_and_momentum_gets_no_gradient():
    model = small_model()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for p in model.online_params():
            p.add_(0.05 * torch.randn_like(p))
    online = [p.detach().clone() for p in model.online_params()]
    before = [p.detach().clone() for p in model.momentum_params()]
    loss, _ = model(x1, x2, 0.9, 0.5)
    loss.backward()
    for b, o, p in zip(before, online, model.momentum_params()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * o)
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_params())


def test_enqueue_overwrites_oldest_and_wraps():
    queue, ptr = torch.zeros(6, 2), torch.zeros(1, dtype=torch.long)
    for i in range(4):
        densecl.enqueue(queue, ptr, torch.full((2, 2), float(i + 1)))
    assert int(ptr) == 2  # 4 batches of 2 in a queue of 6: 0 -> 2 -> 4 -> 0 -> 2
    want = F.normalize(torch.ones(2), dim=0)
    torch.testing.assert_close(queue, torch.cat([want.expand(2, 2)] * 3))  # normalised: 1, 2, 3, 4 look alike
    queue, ptr = torch.zeros(6, 2), torch.zeros(1, dtype=torch.long)
    for i, v in enumerate(([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0])):
        densecl.enqueue(queue, ptr, torch.tensor([v, v]))
    assert queue[:, 0].tolist() == [0, 0, 0, 0, -1, -1] and queue[:, 1].tolist() == [-1, -1, 1, 1, 0, 0]


# ---------------------------------------------------------------------------- shuffle-BN


def test_shuffle_bn_restores_order_and_really_splits():
    torch.manual_seed(0)
    x = torch.arange(12.0)[:, None].expand(12, 3).contiguous()  # sample i holds i
    seen = []

    def enc(c):
        seen.append(c[:, 0].clone())
        return c * 2, c.sum(1)

    a, b = densecl.shuffle_bn(enc, x, splits=3)
    assert torch.equal(a, x * 2) and torch.equal(b, x.sum(1))  # the original order is back
    assert [len(c) for c in seen] == [4, 4, 4]  # three sub-batches
    assert (sorted(torch.cat(seen).tolist()) == list(range(12))
            and not torch.equal(torch.cat(seen), x[:, 0]))  # shuffled
    # with BN in train mode the sub-batches have their own statistics (so the split matters) ...
    bn = nn.BatchNorm1d(3)
    z = torch.randn(12, 3)
    split = densecl.shuffle_bn(lambda c: (bn(c),), z, splits=3)[0]
    assert not torch.allclose(split, bn(z), atol=1e-3)
    # ... and with fixed statistics the emulation changes nothing
    bn.eval()
    torch.testing.assert_close(densecl.shuffle_bn(lambda c: (bn(c),), z, splits=3)[0], bn(z))


# shuffle-BN across ranks and one step vs one process: tests/test_distributed.py


# ---------------------------------------------------------------------------- the script


def test_resume_restores_queues_and_pointers_and_draws_matches(tmp_path):
    out, png = str(tmp_path / "run"), str(tmp_path / "m.png")
    densecl.main([*TINY_DCL, "--output-dir", out, "--max-steps", "2", "--show-matches", png])
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]
    assert int(ck["queue_ptr"]) == int(ck["dense_queue_ptr"]) == 16  # 2 steps x batch 8
    img = Image.open(png)
    assert img.size[0] > 2 * 192 and img.size[1] >= 4 * 192
    densecl.main([*TINY_DCL, "--output-dir", out, "--max-steps", "3", "--resume", "auto"])
    ck2 = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]
    assert int(ck2["queue_ptr"]) == int(ck2["dense_queue_ptr"]) == 24  # continued from 16, not from 0
    for name in ("queue", "dense_queue"):  # the restored entries survive; only 16:24 is new
        torch.testing.assert_close(ck2[name][:16], ck[name][:16])
        assert not torch.allclose(ck2[name][16:24], ck[name][16:24])


@pytest.mark.parametrize("flags, expected", [
    (["--queue-size", "60"], "not a multiple of the global --batch-size 8"),
    (["--stem", "imagenet"], "1x1 final feature map"),
    (["--arch", "vit_small", "--stem", "imagenet", "--img-size", "16"], "1x1 final feature map"),  # patches
])
def test_densecl_bad_input(tmp_path, capsys, flags, expected):
    # in-process (the checks run before any model or data is built): one "error:" line, exit code 2
    with pytest.raises(SystemExit) as e:
        densecl.main([*TINY_DCL, "--output-dir", str(tmp_path / "bad"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_presets_give_a_4x4_grid_and_a_whole_number_of_batches_per_queue():
    for name in ("cifar", "cpu"):
        a = densecl.Args(**densecl.PRESETS[name])
        assert common.final_grid(a.arch, a.stem, a.img_size) >= 4
        assert a.queue_size % a.batch_size == 0 and a.batch_size % a.shuffle_splits == 0
    assert densecl.Args().queue_size == 65536 and densecl.Args().momentum == 0.999  # the paper's recipe

