"""--arch with any classification model of torchvision's registry: every training script on RegNet (and
DenseCL on ConvNeXt too) runs, resumes exactly and exports a backbone that loads strictly into the torchvision
model; the final spatial map found by tracing equals the family's own forward; one-line errors for an unknown
arch, an explicit --stem small on another family, a model without a spatial map and a final grid too small."""
import importlib
import os

import pytest
import torch
import torch.nn as nn
import torchvision

import common
from conftest import losses

# 8 images / batch 4 = 2 steps, one epoch; DenseCL and DetCon at 64 px: a 2x2 final grid (stride 32)
TINY = ["--data", "synthetic", "--synthetic-size", "8", "--batch-size", "4", "--workers", "0", "--log-every",
        "1", "--knn-every", "0", "--mlp-dim", "32", "--max-steps", "2", "--img-size", "32"]
EXTRA = {"densecl": ["--img-size", "64", "--queue-size", "8", "--shuffle-splits", "2"],
         "detcon": ["--img-size", "64", "--masks", "grid"]}
# the family's own forward to its final map, written by hand
HAND = {"regnet_y_400mf": lambda m, x: m.trunk_output(m.stem(x)), "convnext_tiny": lambda m, x: m.features(x)}
# every script on RegNet, resumed from step 1; ConvNeXt (28M parameters: a few seconds a run) on DenseCL only,
# without the resume (the same code path as RegNet's) to keep the file within its time budget
RUNS = [(m, "regnet_y_400mf", True) for m in ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")] + [
    ("densecl", "convnext_tiny", False)]


def torchvision_backbone(arch):
    """What README says: torchvision's model with its last Linear (the classifier) replaced by Identity."""
    net = torchvision.models.get_model(arch)
    net.set_submodule([n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1], nn.Identity())
    return net


@pytest.mark.parametrize("method,arch,resume", RUNS)
def test_runs_resumes_exactly_and_exports(method, arch, resume, tmp_path, monkeypatch, capsys):
    mod, out, resumed = importlib.import_module(method), tmp_path / "run", tmp_path / "resumed"
    monkeypatch.setattr(common, "plot_curves", lambda *a: None)  # curves.png: tested in test_scripts.py
    end_of_step = common.end_of_step

    def keeping_step_1(run, log, state):  # a checkpoint at step 1, moved to where the resumed run starts
        if log.step == 1:
            common.save_checkpoint(run, log, state)
            resumed.mkdir()
            os.replace(out / "checkpoint.pth", resumed / "checkpoint.pth")
        return end_of_step(run, log, state)

    if resume:
        monkeypatch.setattr(common, "end_of_step", keeping_step_1)
    argv = [*TINY, "--arch", arch, *EXTRA.get(method, [])]
    mod.main([*argv, "--output-dir", str(out)])
    sd = torch.load(out / "backbone.pth", weights_only=True)
    assert sd._metadata["effssl"]["arch"] == arch
    if resume:
        monkeypatch.setattr(common, "end_of_step", end_of_step)
        mod.main([*argv, "--output-dir", str(resumed), "--resume", "auto"])
        assert "resumed from" in capsys.readouterr().out
        full = losses(out)
        assert len(full) == 2 and losses(resumed) == pytest.approx(full[1:], rel=1e-6, abs=1e-7)
        again = torch.load(resumed / "backbone.pth", weights_only=True)
        assert sd.keys() == again.keys()
        assert all(torch.allclose(sd[k].float(), again[k].float(), atol=1e-6) for k in sd)
    net = torchvision_backbone(arch)
    net.load_state_dict(sd, strict=True)
    x, found = torch.randn(2, 3, 64, 64), common.traced_map(arch, 64)
    with torch.no_grad():
        for train in (True, False):  # train: batch statistics (and ConvNeXt's stochastic depth: same seed)
            net.train(train)
            torch.manual_seed(0)
            generic = found.forward[0 if train else 1](net, x)["map"]  # traced, run on this net's modules
            torch.manual_seed(0)
            assert generic.shape == (2, 440 if arch.startswith("regnet") else 768, 2, 2)
            assert torch.equal(generic, HAND[arch](net, x)), train


def test_built_for_a_dense_method_the_map_channels_and_only_what_the_map_reads_trains():
    """spatial=True (DenseCL, DetCon): the dim is the map's channels, and what the map does not read is frozen
    (MobileNetV3's hidden Linear after the pool: never used, so DDP finds every trainable parameter used);
    common.feature_map on such a net runs the traced forward."""
    net, dim = common.build_backbone("mobilenet_v3_small", img_size=64, spatial=True)
    assert dim == 576 and common.build_backbone("mobilenet_v3_small", img_size=64)[1] == 1024
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == {"classifier.0.weight",
                                                                              "classifier.0.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(common.feature_map(net.eval(), x), net.features(x))


def _error(capsys, method, *argv):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(method).main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_arch_and_stem_errors_are_one_line(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "bad")]
    err = _error(capsys, "mocov3", *TINY, "--arch", "convnext_tiniest", *out)
    assert "unknown arch 'convnext_tiniest'" in err and "torchvision.models.list_models" in err
    err = _error(capsys, "mocov3", *TINY, "--arch", "regnet_y_400mf", "--stem", "small", *out)
    assert "--stem small is a ResNet stem" in err
    assert common.parse_args(mocov3_args(), {"p": dict(stem="small")}, ["--preset", "p", "--arch",
                                                                         "regnet_y_400mf"]).stem == "small"
    with torch.device("meta"):  # the whole ResNet family of the registry keeps the small stem (shapes only)
        net, dim = common.build_backbone("resnext50_32x4d", "small", 32)
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity) and dim == 2048
    err = _error(capsys, "densecl", *TINY, "--arch", "regnet_y_400mf", "--img-size", "32", *out)
    assert "gives a 1x1 final feature map; DenseCL needs at least 2x2" in err and "--stem" not in err
    err = _error(capsys, "mocov3", *TINY, "--arch", "squeezenet1_0", *out)
    assert "squeezenet1_0 has no Linear classifier" in err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def mocov3_args():
    return importlib.import_module("mocov3").Args


def test_a_model_without_a_spatial_map_is_refused_by_name(monkeypatch, capsys, tmp_path):
    """A model whose activations all have fixed sizes (pooled to 4x4 first) has no final map to find."""
    cached = (common._probe_model, common.probe_run, common._every_node, common.traced_map)
    for f in cached:
        f.cache_clear()
    pooled_first = lambda arch, size: nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, 8, 1),  # noqa: E731
                                                    nn.Flatten(), nn.Linear(128, 10))
    monkeypatch.setattr(common, "registry_model", pooled_first)
    try:
        err = _error(capsys, "detcon", *TINY, "--arch", "vgg11", "--img-size", "64",
                     "--output-dir", str(tmp_path / "bad"))
    finally:
        for f in cached:
            f.cache_clear()
    assert "--arch vgg11 has no spatial feature map (DenseCL, DetCon and the dense probes need one)" in err
