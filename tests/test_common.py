"""common.py: LARS, schedules, backbones, data determinism, argument parsing, checkpoints, kNN."""
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import eval_linear
import mocov3


def test_lars_excludes_1d_params_from_weight_decay_and_trust_scaling():
    w, b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))
    w.grad, b.grad = torch.full((3, 2), 0.5), torch.full((3,), 0.5)
    opt = common.LARS([w, b], lr=1.0, weight_decay=0.1, momentum=0.0, trust_coefficient=0.001)
    opt.step()
    # 1-D: plain SGD step, no decay, no trust ratio
    assert torch.allclose(b, torch.full((3,), 1 - 0.5))
    # 2-D: dp = g + wd * p, scaled by trust * |p| / |dp|
    dp = torch.full((3, 2), 0.5 + 0.1 * 1.0)
    expected = 1 - 0.001 * math.sqrt(6) / dp.norm() * dp
    assert torch.allclose(w, expected)


def test_lars_momentum_accumulates():
    p = nn.Parameter(torch.zeros(4))
    opt = common.LARS([p], lr=0.1, momentum=0.9)
    for _ in range(2):
        p.grad = torch.ones(4)
        opt.step()
    assert torch.allclose(p, torch.full((4,), -0.1 * (1 + 1.9)))


class LoopLARS(torch.optim.Optimizer):
    """Reference: common.LARS as it was, one parameter at a time (the math the multi-tensor version keeps)."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["trust_coefficient"]
                                                                  * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


class EdgeNet(nn.Module):
    """Conv (with bias), BN, linear (with bias) and the edge cases of the trust ratio: a parameter that starts
    at zero (|p| = 0 at step 1), one that stays zero with zero gradient (both norms 0), one with a zero
    gradient (|dp| = 0 without weight decay), and one that never gets a gradient."""
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.starts_zero = nn.Parameter(torch.zeros(5, 5))
        self.stays_zero = nn.Parameter(torch.zeros(2, 3))
        self.zero_grad_w = nn.Parameter(torch.randn(3, 3))
        self.no_grad_w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):  # x [N, 3, 6, 6]
        h = self.fc(self.bn(torch.relu(self.conv(x))).flatten(1))  # [N, 5]; BN after ReLU: conv.bias matters
        return (h @ self.starts_zero + h).square().mean()


def edge_groups(net, two_groups):
    """All parameters in one group, or split in two groups with their own lr, weight decay and momentum."""
    params = list(net.parameters())
    if not two_groups:
        return params
    return [{"params": params[:4]}, {"params": params[4:], "lr": 0.05, "weight_decay": 0.0, "momentum": 0.5}]


def edge_backward(net, x, twin=None):
    """Real gradients, then the edge cases: zero gradients for two parameters, none for one. `twin` (a copy
    of net) gets the same gradients, so that the two optimizers see the same inputs at every step."""
    for p in net.parameters():
        p.grad = None
    net(x).backward()
    net.stays_zero.grad, net.zero_grad_w.grad = torch.zeros(2, 3), torch.zeros(3, 3)
    for a, b in zip(twin.parameters() if twin else (), net.parameters()):
        a.grad = None if b.grad is None else b.grad.clone()


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("two_groups", [False, True])
def test_foreach_lars_equals_the_per_tensor_loop_step_for_step(wd, two_groups):
    torch.manual_seed(0)
    ref_net = EdgeNet()
    net = EdgeNet()
    net.load_state_dict(ref_net.state_dict())
    kw = dict(lr=0.5, weight_decay=wd, momentum=0.9, trust_coefficient=0.02)  # large: visible in 5 steps
    ref = LoopLARS(edge_groups(ref_net, two_groups), **kw)
    opt = common.LARS(edge_groups(net, two_groups), **kw)
    x = torch.randn(8, 3, 6, 6)
    start = [p.detach().clone() for p in net.parameters()]
    for _ in range(5):
        edge_backward(ref_net, x, twin=net)
        ref.step(), opt.step()
        for (name, a), b in zip(net.named_parameters(), ref_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
            if b.grad is not None:
                mu, ref_mu = opt.state[a]["mu"], ref.state[b]["mu"]
                torch.testing.assert_close(mu, ref_mu, rtol=1e-6, atol=1e-9, msg=name)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    moved = {n for (n, p), s in zip(net.named_parameters(), start) if not torch.equal(p, s)}
    # every real parameter moved; the zero-gradient one only through weight decay; the others never
    real = {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias", "starts_zero"}
    assert real <= moved
    assert ("zero_grad_w" in moved) == (wd > 0) and not {"stays_zero", "no_grad_w"} & moved
    assert net.no_grad_w not in opt.state


def test_lars_state_layout_resumes_a_loop_checkpoint():
    torch.manual_seed(1)
    ref_net = EdgeNet()
    net = EdgeNet()
    kw = dict(lr=0.3, weight_decay=0.01, trust_coefficient=0.01)
    ref, x = LoopLARS(ref_net.parameters(), **kw), torch.randn(8, 3, 6, 6)
    for _ in range(2):
        edge_backward(ref_net, x)
        ref.step()
    net.load_state_dict(ref_net.state_dict())
    opt = common.LARS(net.parameters(), **kw)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)  # a checkpoint written by the loop version
    buf.seek(0)
    opt.load_state_dict(torch.load(buf))
    for _ in range(3):
        edge_backward(ref_net, x, twin=net)
        ref.step(), opt.step()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    assert all(s.keys() == {"mu"} for s in opt.state_dict()["state"].values())


def lars_step_ops(depth):
    """Top-level ATen calls of LARS's second step on `depth` linear layers (the first builds the state)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt = common.LARS(net.parameters(), lr=0.1, weight_decay=0.1)
    opt.step()
    with Count():
        opt.step()
    return Count.n


def test_lars_step_op_count_does_not_grow_with_the_parameter_count():
    # multi-tensor ops: the same calls for 4 or 40 parameters (a per-tensor loop makes ~10 per parameter)
    assert lars_step_ops(20) == lars_step_ops(2)


def test_lr_schedule_known_points():
    assert common.cosine_lr(0, 1.0, 10, 100) == 0
    assert common.cosine_lr(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert common.cosine_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert common.cosine_lr(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert common.cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_momentum_schedule_known_points():
    assert common.cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert common.cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert common.cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_set_lr_sets_every_group():
    """common holds no method rule: a group that keeps its lr (Fast-MoCo's predictor) is the method's
    business."""
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                           {"params": [nn.Parameter(torch.zeros(1))], "fixed_lr": True}], lr=0.5)
    common.set_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


def test_vit_small_has_12_heads_and_frozen_sincos_position_embedding():
    net, dim = common.build_backbone("vit_small", img_size=32)
    assert dim == 384 and net.encoder.layers[0].self_attention.num_heads == 12
    pe = net.encoder.pos_embedding
    assert not pe.requires_grad and pe.shape == (1, 1 + 4, 384)
    assert torch.allclose(pe[0, 1:], common.sincos_pos_embed(384, 2)[0]) and pe[0, 0].abs().sum() == 0
    assert not net.conv_proj.weight.requires_grad  # frozen random patch projection
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    assert common.feature_map(net, torch.randn(2, 3, 32, 32)).shape == (2, 384, 2, 2)


def test_sincos_matches_numpy():
    dim, grid = 8, 3
    gw, gh = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    ow, oh = np.outer(gw.ravel(), omega), np.outer(gh.ravel(), omega)
    expected = np.concatenate([np.sin(ow), np.cos(ow), np.sin(oh), np.cos(oh)], 1)
    assert np.allclose(common.sincos_pos_embed(dim, grid)[0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("stem,size,grid", [("imagenet", 64, 2), ("small", 32, 4)])
def test_resnet_stems_and_feature_map(stem, size, grid):
    net, dim = common.build_backbone("resnet18", stem, size)
    x = torch.randn(2, 3, size, size)
    net.eval()
    fmap = common.feature_map(net, x)
    assert fmap.shape == (2, dim, grid, grid) and common.final_grid("resnet18", stem, size) == grid
    assert torch.allclose(net(x), fmap.mean((2, 3)), atol=1e-5)  # pooled feature = mean of the map


def test_synthetic_is_deterministic_labeled_and_split():
    train, val = common.Synthetic(20, "train"), common.Synthetic(20, "val")
    a, la = train[3]
    b, lb = train[3]
    assert la == lb == 3 and np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (64, 64)
    assert not np.array_equal(np.asarray(train[3][0]), np.asarray(val[3][0]))
    assert train.targets == [i % 10 for i in range(20)]


def test_views_same_augmentation_in_any_worker_and_order():
    ds = common.Views(common.Synthetic(8), common.TwoViews(*mocov3.byol_augmentations(32, 0.2)), seed=1)
    direct = [ds[i][0][0] for i in (5, 2)]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=[2, 5], num_workers=2)
    got = {i: x[0] for i, ((x, _), _) in zip([2, 5], loader)}
    assert torch.equal(got[5], direct[0]) and torch.equal(got[2], direct[1])
    ds.epoch = 1
    assert not torch.equal(ds[5][0][0], direct[0])  # a new epoch draws new augmentations
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left untouched


def test_parse_args_precedence_and_auto_preset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # without a GPU: cpu (test_misuse_run.py)
    a = common.parse_args(mocov3.Args, mocov3.PRESETS, [])
    assert a.preset == "cpu" and a.img_size == mocov3.PRESETS["cpu"]["img_size"]
    a = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--img-size", "48", "--no-blur"])
    assert a.img_size == 48 and a.blur is False and a.batch_size == mocov3.PRESETS["cpu"]["batch_size"]
    a = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--data", "cifar10"])
    assert a.preset == "cifar" and a.stem == "small" and a.img_size == 32
    a = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--data", "/imagenet"])
    assert a.preset == "imagenet" and a.batch_size == 4096 and a.arch == "resnet50"
    with pytest.raises(common.BadInput, match="unknown preset"):
        common.parse_args(mocov3.Args, mocov3.PRESETS, ["--preset", "nope"])


def test_every_args_field_has_a_doc():
    docs = common.field_docs(mocov3.Args)
    missing = [f.name for f in dataclasses.fields(mocov3.Args) if not docs.get(f.name)]
    assert not missing


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    common.save_atomic({"a": torch.ones(2)}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # and no temporary file is left behind


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    common.seed_everything(3)
    state = common.rng_state()
    common.save_atomic(state, str(tmp_path / "rng.pth"))
    expected = (torch.rand(2), np.random.rand(), __import__("random").random())
    common.set_rng_state(torch.load(str(tmp_path / "rng.pth"), weights_only=True))
    assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]
    assert __import__("random").random() == expected[2]


def test_knn_vote_matches_numpy():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 4, generator=g), dim=1)
    labels = torch.randint(0, 3, (30,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    scores = common.knn_vote(q, bank, torch.nn.functional.one_hot(labels, 3).float(), k=7, t=0.1).numpy()
    sim = q.numpy() @ bank.numpy().T
    for i in range(5):
        nn_idx = np.argsort(-sim[i])[:7]
        expected = np.zeros(3)
        for j in nn_idx:
            expected[labels[j]] += np.exp(sim[i, j] / 0.1)
        assert np.allclose(scores[i], expected / expected.sum(), rtol=1e-5)


def test_load_backbone_rejects_foreign_files(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "x.pth")
    with pytest.raises(common.BadInput, match="not a compatible checkpoint"):
        eval_linear.load_backbone(str(tmp_path / "x.pth"))
    with pytest.raises(common.BadInput, match="not found"):
        eval_linear.load_backbone(str(tmp_path / "missing.pth"))


def test_all_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert common.all_gather_nograd(x) is x and common.get_world_size() == 1 and common.get_rank() == 0
    assert "RANK" not in os.environ or os.environ["WORLD_SIZE"] == "1"


def test_summary_times_the_steps_only(tmp_path, monkeypatch):
    """img/s and step_ms cover the steps after warm-up: not the final checkpoint/export, nor an evaluation;
    data_time_frac is the loader wait in that window. A fake clock makes it exact."""
    now = [0.0]

    def perf_counter():
        return now[0]

    monkeypatch.setattr(common.time, "perf_counter", perf_counter)
    args = common.parse_args(mocov3.Args, mocov3.PRESETS,
                             ["--batch-size", "4", "--log-every", "100", "--epochs", "1"])
    run = common.Run(args, "mocov3", 0, 1, torch.device("cpu"), str(tmp_path))
    log = common.Logger(run, steps_per_epoch=6, start_step=0)

    def loader():
        for _ in range(6):
            now[0] += 1.0  # waiting for the batch: 1 s
            yield None

    batches = log.timed(loader())  # the loader wait, timed as in every training loop
    for step in range(1, 7):
        next(batches)
        now[0] += 9.0  # the step: 9 s
        log.log_step(torch.tensor(1.0))
    log.log_eval(50.0, knn_top1=1.0)  # a final evaluation...
    now[0] += 1000.0  # ... and the final checkpoint and export: neither is training time
    rec = log.summary()
    assert rec["step_ms"] == pytest.approx(10_000)  # steps 3..6: 40 s over 4 steps
    assert rec["img_per_s"] == pytest.approx(4 / 10)
    assert rec["data_time_frac"] == pytest.approx(0.1)


def test_plot_curves_draws_every_logged_metric(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    recs = [{"step": s, "epoch": s / 4, "loss": 3.0 - 0.1 * s, "lr": 0.1, "momentum": 0.99,
             "rot_acc": 50.0 + s, "img_per_s": 10.0} for s in range(1, 9)]
    recs += [{"step": 8, "epoch": 2, "knn_top1": 40.0, "train_s": 3.0},
             {"event": "summary", "steps": 8, "loss": 2.2}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    panels = common.plot_curves(str(log), str(tmp_path / "curves.png"))
    assert panels == ["loss", "lr", "momentum", "rot_acc", "knn_top1"]  # throughput and timing are not curves
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_flag_writes_scalars_or_names_the_missing_package(tmp_path, capsys):
    import importlib.util
    argv = ["--data", "synthetic", "--synthetic-size", "16", "--img-size", "32", "--batch-size", "8",
            "--workers", "0", "--knn-every", "0", "--mlp-dim", "32", "--max-steps", "2", "--tensorboard",
            "--output-dir", str(tmp_path)]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit) as e:
            mocov3.main(argv)
        assert e.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err
    else:
        mocov3.main(argv)
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_parse_args_names_the_flags_given_even_abbreviated():
    args = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--batch-s", "8", "--no-blur"])
    assert args.given == {"batch_size", "blur"} and args.batch_size == 8 and args.blur is False
    assert "given" not in dataclasses.asdict(args)  # not recorded in args.json or a checkpoint


def test_a_val_folder_with_fewer_classes_keeps_train_labels_and_an_unknown_class_is_refused(tmp_path):
    """ImageFolder numbers each split's own class folders: a val/ without class b must still label c as 2
    (train's index), or kNN and the probes score against shifted labels; a class train/ lacks is refused."""
    from PIL import Image
    for split, classes in (("train", "abc"), ("val", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "x.png")
    args = eval_linear.Args(data=str(tmp_path))
    val = common.load_dataset(args, "val")
    assert val.targets == [0, 2] and [y for _, y in val] == [0, 2] and val.classes == ["a", "b", "c"]
    assert common.load_dataset(args, "train").targets == [0, 1, 2]
    (tmp_path / "val" / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "d" / "x.png")
    with pytest.raises(common.BadInput, match=r"val/ has class folders that train/ has not \(d\)"):
        common.load_dataset(args, "val")
