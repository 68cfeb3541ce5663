"""fast_moco.py: the split, the combination, the loss, who sees what, the lr schedule and the predictor's
constant lr, distributed equivalence and the method-specific options (the generic script contract is in
test_scripts.py)."""
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

import common
import fast_moco as fm
from conftest import TINY, read_log


def tiny_args(**kw):
    a = common.parse_args(fm.Args, fm.PRESETS, ["--img-size", "32", "--mlp-dim", "64", "--batch-size", "8"])
    return dataclasses.replace(a, **kw)


# ---------------------------------------------------------------------------- split and combine


@pytest.mark.parametrize("grid,h,w", [(2, 8, 12), (3, 9, 6), (1, 5, 5)])
def test_split_tiles_the_view_exactly(grid, h, w):
    x = torch.randn(3, 2, h, w)
    p = fm.split_patches(x, grid)
    ph, pw = h // grid, w // grid
    assert p.shape == (grid * grid, 3, 2, ph, pw)
    back = torch.empty_like(x)
    for i in range(grid):  # documented order: row-major, patch i * grid + j = row i, column j
        for j in range(grid):
            back[..., i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = p[i * grid + j]
    assert torch.equal(back, x)  # every pixel exactly once, no resize


def test_split_row_major_2x2_and_bad_size():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = fm.split_patches(x)[:, 0, 0]  # [4, 2, 2]
    assert p[0].tolist() == [[0, 1], [4, 5]] and p[1].tolist() == [[2, 3], [6, 7]]  # top-left, top-right
    # bottom-left, -right
    assert p[2].tolist() == [[8, 9], [12, 13]] and p[3].tolist() == [[10, 11], [14, 15]]
    with pytest.raises(ValueError):
        fm.split_patches(torch.zeros(1, 3, 5, 4))


def test_combine_order_and_values_match_numpy():
    feats = torch.randn(4, 5, 7, dtype=torch.float64)
    out = fm.combine_patches(feats, 2)
    assert out.shape == (6, 5, 7)
    f = feats.numpy()
    ref = np.stack([(f[a] + f[b]) / 2 for a, b in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]])
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    # order of itertools.combinations, seen through constant features: patch p has value p
    const = torch.arange(4.0)[:, None, None].expand(4, 1, 1)
    assert fm.combine_patches(const, 2).flatten().tolist() == [0.5, 1.0, 1.5, 1.5, 2.0, 2.5]
    for k in (1, 3, 4):  # other subset sizes, also vs numpy
        ref = np.stack([f[list(c)].mean(0) for c in itertools.combinations(range(4), k)])
        np.testing.assert_allclose(fm.combine_patches(feats, k).numpy(), ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- loss


def numpy_loss(p1, p2, z1, z2, t):
    """Transcription of the official loss: mean of the 12 cross-entropies, p1's 6 chunks vs z2, p2's vs z1."""
    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    ces = []
    for p, z in ((p1, z2), (p2, z1)):
        for chunk in unit(p):
            logits = chunk @ unit(z).T / t  # [N, N]
            logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
                - logits.max(1, keepdims=True)
            ces.append(-np.mean(np.diag(logp)))
    assert len(ces) == 2 * len(p1)
    return float(np.mean(ces))


@pytest.mark.parametrize("t", [1.0, 0.2])
def test_loss_matches_numpy(t):
    g = torch.Generator().manual_seed(0)
    p1, p2 = (torch.randn(6, 10, 16, generator=g, dtype=torch.float64),
              torch.randn(6, 10, 16, generator=g, dtype=torch.float64))
    z1, z2 = (torch.randn(10, 16, generator=g, dtype=torch.float64),
              torch.randn(10, 16, generator=g, dtype=torch.float64))
    z1[0] = p2[3, 0] * 5  # a few strong positives, so a swapped pairing would change the value
    z2[1] = p1[0, 1] * 3
    got = fm.fast_moco_loss(p1, p2, z1, z2, t).item()
    assert got == pytest.approx(numpy_loss(*(a.numpy() for a in (p1, p2, z1, z2)), t), rel=1e-10)
    # no 2*tau factor: the value at random init is ~ln N, whatever tau
    assert fm.fast_moco_loss(p1 * 0, p2 * 0 + 1, z1 * 0 + 1, z2 * 0 + 1, t).item() == pytest.approx(
        np.log(10))


# ---------------------------------------------------------------------------- who sees what


def test_momentum_sees_full_views_online_sees_only_patches(monkeypatch):
    torch.manual_seed(0)
    model = fm.FastMoCo(tiny_args())
    seen = {"backbone": [], "momentum_backbone": [], "projector": [], "momentum_projector": []}
    for name in seen:
        getattr(model, name).register_forward_hook(lambda mod, inp, out, name=name: seen[name].append(inp[0]))
    got = {}
    monkeypatch.setattr(fm, "fast_moco_loss", lambda *a: got.setdefault("args", a)[0].sum())
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model(x1, x2, 0.99)
    # 4N patches, one pass per view
    assert [tuple(x.shape) for x in seen["backbone"]] == [(16, 3, 16, 16)] * 2
    assert torch.equal(seen["backbone"][0], fm.split_patches(x1).flatten(0, 1))
    assert len(seen["momentum_backbone"]) == 2  # the full, un-split views, nothing else
    assert seen["momentum_backbone"][0] is x1 and seen["momentum_backbone"][1] is x2
    assert [tuple(x.shape) for x in seen["projector"]] == [(24, 512)] * 2  # 6N combined rows per view
    assert [tuple(x.shape) for x in seen["momentum_projector"]] == [(4, 512)] * 2
    p1, p2, z1, z2, t = got["args"]
    assert t == model.temperature
    assert p1.shape == p2.shape == (6, 4, 64) and z1.shape == z2.shape == (4, 64)
    with torch.no_grad():  # z1 is the momentum encoder's embedding of x1 (the loss pairs p1 with z2)
        assert torch.allclose(z1, model.momentum_projector(model.momentum_backbone(x1)), atol=1e-6)
        assert not torch.allclose(z1, z2)
    assert not z1.requires_grad and p1.requires_grad


def test_combination_options_change_the_number_of_queries(monkeypatch):
    torch.manual_seed(0)
    got = {}
    monkeypatch.setattr(fm, "fast_moco_loss", lambda *a: got.setdefault("p1", a[0]).sum())
    model = fm.FastMoCo(tiny_args(grid=4, combine=3, img_size=64))
    model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), 0.99)
    assert got["p1"].shape == (560, 2, 64)  # C(16, 3) combined queries per image


# ---------------------------------------------------------------------------- lr schedule and optimizer


def official_warmup(i, warmup, peak):
    """Transcription of the official WCosConLR warm-up, 1-based iteration i = 1..W, init_lr = peak / 4."""
    init = peak / 4
    return init + (peak - init) * (i - 1) / (warmup - 1)


@pytest.mark.parametrize("spe,warmup_epochs", [(10, 2), (40, 0.5), (7, 1)])
def test_warmup_starts_at_a_quarter_of_the_peak_and_reaches_it(spe, warmup_epochs):
    peak, epochs = 0.3, 5
    w = round(spe * warmup_epochs)
    lrs = [fm.fast_moco_lr(it, spe, peak, warmup_epochs, epochs) for it in range(w)]
    assert lrs[0] == pytest.approx(peak / 4, rel=1e-12)  # our iteration 0 = official iteration 1
    assert lrs[-1] == pytest.approx(peak, rel=1e-12)  # the last warm-up iteration is at the peak
    assert all(a < b for a, b in zip(lrs, lrs[1:]))  # strictly rising
    np.testing.assert_allclose(lrs, [official_warmup(i, w, peak) for i in range(1, w + 1)], rtol=1e-12)


def test_after_warmup_the_lr_is_the_common_cosine():
    spe, peak, warmup_epochs, epochs = 10, 0.3, 2, 5
    for it in range(warmup_epochs * spe, epochs * spe + 1):
        want = common.cosine_lr(it / spe, peak, warmup_epochs, epochs)  # the peak at it = W, 0 at the end
        got = fm.fast_moco_lr(it, spe, peak, warmup_epochs, epochs)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert fm.fast_moco_lr(0, spe, peak, 0, epochs) == pytest.approx(peak)  # no warm-up: cosine from the peak


def test_predictor_lr_constant_rest_follows_schedule():
    torch.manual_seed(0)
    args = tiny_args(lr=0.5, warmup_epochs=1, epochs=3)
    model = fm.FastMoCo(args)
    groups = fm.param_groups(model)
    pred = {id(p) for p in model.predictor.parameters()}
    assert {id(p) for p in groups[1]["params"]} == pred and not pred & {id(p) for p in groups[0]["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainable)
    opt = common.build_optimizer(args, groups)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    base = 0.5 * 8 / 256
    x = torch.randn(4, 3, 32, 32)
    spe = 10
    for it in (0, 9, 15, 29):  # warm-up start (base / 4), its end (base), cosine decay
        lr = fm.fast_moco_lr(it, spe, base, args.warmup_epochs, args.epochs)
        fm.set_lrs(opt, lr, base)
        before = [p.detach().clone() for p in model.predictor.parameters()]
        common.optimizer_step(model(x, x.flip(3), 0.99), opt, scaler, trainable, 1.0)
        assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == base
        assert any(not torch.equal(a, b) for a, b in zip(before, model.predictor.parameters()))
    assert opt.param_groups[0]["lr"] < base / 2


# distributed equivalence (loss on fixed embeddings, one step vs one process): tests/test_distributed.py


# ---------------------------------------------------------------------------- the script's wiring (generic
# contract, resume, torchrun and export are in test_scripts.py)


def test_script_keeps_predictor_lr_constant(tmp_path):
    out = tmp_path / "run"
    fm.main([*TINY, "--max-steps", "3", "--warmup-epochs", "0.5", "--output-dir", str(out)])
    log = [r for r in read_log(out) if "lr" in r]
    assert len(log) == 3 and len({r["lr"] for r in log}) == 3  # warmup: the scheduled lr changes every step
    base = fm.PRESETS["cpu"]["lr"] * 8 / 256  # the predictor keeps the cpu preset's base lr at batch 8
    assert log[0]["lr"] == pytest.approx(base / 4)  # the warm-up starts at a quarter of the peak, not at 0
    assert all(r["pred_lr"] == pytest.approx(base) for r in log) and log[-1]["lr"] < base
    groups = torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert groups[1]["fixed_lr"] and groups[1]["lr"] == pytest.approx(base)  # what the optimizer used
    assert groups[0]["lr"] == pytest.approx(log[-1]["lr"])
    assert json.load(open(out / "args.json"))["grid"] == 2


@pytest.mark.parametrize("flags,msg", [(["--arch", "vit_small"], "does not run on 16-px inputs (the --grid"),
                                       (["--img-size", "33"], "divisible by --grid"),
                                       (["--grid", "0"], "--grid 0 is out of range"),
                                       (["--combine", "5"], "--combine must be")])
def test_bad_options_one_line_exit_2(capsys, flags, msg):
    with pytest.raises(SystemExit) as e:
        fm.main([*TINY, *flags])  # refused before anything is built or written
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1
