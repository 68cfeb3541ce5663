"""rotation_aux.py: rotation labels, where the rotated views go, --rot-weight 0 == mocov3.py, the
script's own outputs and flags (the shared script contract is in test_scripts.py)."""
import json

import pytest
import torch
import torchvision

import common
import mocov3
import rotation_aux
from conftest import TINY, read_log

SMALL = dict(arch="resnet18", img_size=32, mlp_dim=64, proj_dim=32, temperature=0.2)


def views(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def rotation_of(img, ref):
    """The j in {0, 1, 2, 3} with img == rot90(ref, j), or None."""
    return next((j for j in range(4) if torch.equal(img, torch.rot90(ref, j, dims=(1, 2)))), None)


# ---------------------------------------------------------------------------- rotate_batch


def test_rotate_batch_labels_match_the_applied_rotation():
    x = torch.randn(4000, 3, 6, 6)
    rot, k = rotation_aux.rotate_batch(x, torch.Generator().manual_seed(0))
    assert rot.shape == x.shape and k.shape == (4000,) and k.dtype == torch.long
    for i in range(len(x)):  # rotating back by k recovers the input, and k is the only rotation that does
        assert torch.equal(torch.rot90(rot[i], -int(k[i]), dims=(1, 2)), x[i])
        assert rotation_of(rot[i], x[i]) == int(k[i])
    counts = torch.bincount(k, minlength=4)
    assert counts.min() > 900 and counts.max() < 1100, counts  # uniform over {0, 1, 2, 3}, 0 included
    assert torch.equal(rot[k == 0], x[k == 0])


def test_rotate_batch_is_seeded_and_needs_square_images():
    x = torch.randn(16, 3, 8, 8)
    a = rotation_aux.rotate_batch(x, torch.Generator().manual_seed(3))
    b = rotation_aux.rotate_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        rotation_aux.rotate_batch(torch.randn(2, 3, 8, 6))


# ---------------------------------------------------------------------------- the model


def record_calls(model):
    """Forward hooks on every part of the model: name -> list of (input, output) per call."""
    calls = {}
    for name in ("backbone", "projector", "predictor", "momentum_backbone", "momentum_projector", "rot_head"):
        calls[name] = []
        getattr(model, name).register_forward_hook(
            lambda mod, inp, out, n=name: calls[n].append((inp[0].detach().clone(), out.detach().clone())))
    return calls


def test_rotated_views_go_through_the_online_backbone_only_each_in_its_own_pass():
    torch.manual_seed(0)
    model = rotation_aux.RotationAux(rotation_aux.Args(**SMALL)).train()
    calls = record_calls(model)
    x1, x2 = views()
    loss, rot_ce, rot_acc = model(x1, x2, 0.99)
    assert loss.requires_grad and 0 <= float(rot_acc) <= 100
    # momentum encoder: exactly the two unrotated views
    assert [c[0].shape[0] for c in calls["momentum_backbone"]] == [8, 8]
    assert (torch.equal(calls["momentum_backbone"][0][0], x1)
            and torch.equal(calls["momentum_backbone"][1][0], x2))
    for a, b in zip(calls["momentum_projector"], calls["momentum_backbone"], strict=True):
        assert torch.equal(a[0], b[1])
    # online backbone: 4 passes of N images each (never one 2N or 4N batch): x1, x2, rot(x1), rot(x2)
    bb = calls["backbone"]
    assert [c[0].shape for c in bb] == [x1.shape] * 4
    assert torch.equal(bb[0][0], x1) and torch.equal(bb[1][0], x2)
    for (rotated, _), x in ((bb[2], x1), (bb[3], x2)):
        ks = [rotation_of(rotated[i], x[i]) for i in range(len(x))]
        assert None not in ks and any(ks), ks  # every image a rotation of its view, not all by 0
    # projector and predictor: only the unrotated views' features; rotation head: only the rotated ones'
    assert len(calls["projector"]) == len(calls["predictor"]) == 2
    for (proj_in, proj_out), (bb_in, bb_out), (pred_in, _) in zip(calls["projector"], bb[:2],
                                                                   calls["predictor"]):
        assert torch.equal(proj_in, bb_out) and torch.equal(pred_in, proj_out)
    assert len(calls["rot_head"]) == 2
    for (head_in, head_out), (_, bb_out) in zip(calls["rot_head"], bb[2:]):
        assert torch.equal(head_in, bb_out) and head_out.shape == (8, 4)


def test_rot_size_rotates_a_downscaled_copy():
    model = rotation_aux.RotationAux(rotation_aux.Args(**SMALL, rot_size=16)).train()
    calls = record_calls(model)
    model(*views(), 0.99)
    assert [tuple(c[0].shape) for c in calls["backbone"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert [tuple(c[0].shape) for c in calls["momentum_backbone"]] == [(8, 3, 32, 32)] * 2


def build_pair(rot_weight):
    torch.manual_seed(0)
    ref = mocov3.MoCoV3(mocov3.Args(**SMALL)).train()
    torch.manual_seed(0)
    rot = rotation_aux.RotationAux(rotation_aux.Args(**SMALL, rot_weight=rot_weight)).train()
    return ref, rot


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rot_weight", [0.0, 0.1])
def test_moco_part_equals_mocov3_and_rot_weight_0_gives_its_loss_and_gradients(rot_weight):
    ref, rot = build_pair(rot_weight)
    sd = rot.state_dict()
    # same seed -> same MoCo v3 weights
    assert all(torch.equal(v, sd[k]) for k, v in ref.state_dict().items())
    x1, x2 = views()
    torch.manual_seed(1)
    loss_ref = ref(x1, x2, 0.99)
    torch.manual_seed(1)
    loss, rot_ce, _ = rot(x1, x2, 0.99)
    # MoCo v3 unchanged
    torch.testing.assert_close(loss - rot_weight * rot_ce, loss_ref, rtol=1e-6, atol=1e-6)
    loss_ref.backward()
    loss.backward()
    g_ref, g_rot = grads(ref), grads(rot)
    same = [torch.allclose(g_ref[n], g_rot[n], rtol=1e-5, atol=1e-7) for n in g_ref]
    if rot_weight == 0:
        assert loss.item() == loss_ref.item() and all(same)
        assert all(float(g.abs().max()) == 0 for n, g in g_rot.items() if n.startswith("rot_head."))
    else:  # the auxiliary gradient reaches the backbone only: projector and predictor gradients are unchanged
        bb = [n.startswith("backbone.") for n in g_ref]
        assert not all(s for s, b in zip(same, bb) if b)
        assert all(s for s, b in zip(same, bb) if not b)


# ---------------------------------------------------------------------------- the script


def test_script_logs_rotation_metrics_and_exports_without_the_head(tmp_path):
    """The generic contract (summary, resume, torchrun, export) is in test_scripts.py; here what is ours."""
    out = tmp_path / "run"
    rotation_aux.main([*TINY, "--max-steps", "2", "--rot-size", "16", "--output-dir", str(out)])
    steps = [r for r in read_log(out) if "loss" in r and r.get("event") != "summary"]
    assert len(steps) == 2 and all(0 <= r["rot_acc"] <= 100 and r["rot_ce"] > 0 for r in steps)
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["rot_weight"] == 0.1 and recorded["rot_size"] == 16
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert any(k.startswith("rot_head.") for k in ck["model"])  # kept for resuming ...
    sd = torch.load(out / "backbone.pth", weights_only=True)
    assert sd and not any("rot_head" in k for k in sd)  # ... dropped from the exported backbone
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)


def test_bad_rotation_flags_are_user_errors(tmp_path, capsys):
    for bad in (dict(rot_weight=-1.0), dict(arch="vit_small", rot_size=16), dict(rot_size=64)):
        # before any work: the range table, then rotation_aux's own checks
        with pytest.raises(common.BadInput):
            args = rotation_aux.Args(**{**SMALL, **bad})
            common.check_ranges(args)
            rotation_aux.check_args(args)
    with pytest.raises(SystemExit) as e:  # from the command line: one "error:" line, exit code 2
        rotation_aux.main([*TINY, "--rot-size", "64", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --rot-size 64"), err
