"""eval_linear's result line says what ran, and flags that do nothing in a mode are refused."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

import eval_linear as E

BASE = ["--synthetic-size", "40", "--img-size", "32", "--stem", "small", "--batch-size", "8",
        "--workers", "0"]


def test_linear_stopped_by_max_steps_reports_the_epochs_it_ran(tmp_path):
    rec = E.main(["--mode", "linear", *BASE, "--epochs", "2", "--max-steps", "1",
                  "--output-dir", str(tmp_path)])
    assert "linear probe (MoCo v3 protocol) 0.2 of 2 ep" in rec["protocol"], rec["protocol"]  # 5 steps/epoch


def test_knn_reports_k_clamped_to_the_bank_and_the_labels_per_class_used(tmp_path):
    rec = E.main(["--mode", "knn", *BASE, "--knn-k", "5000", "--labels-per-class", "100000", "--output-dir",
                  str(tmp_path)])
    assert rec["protocol"].startswith("weighted kNN k=40 ") and ", 4 labels/class" in rec["protocol"], rec


@pytest.mark.parametrize("flags, expected", [
    (["--mode", "knn", "--show-seg", "x.png"], "--show-seg does nothing in --mode knn"),
    (["--mode", "knn", "--epochs", "3"], "--epochs does nothing in --mode knn"),
    (["--mode", "knn", "--epo", "3"], "--epochs does nothing in --mode knn"),  # a prefix is the flag
    (["--mode", "seg", "--knn-k", "3"], "--knn-k does nothing in --mode seg"),
    (["--mode", "seg-knn", "--labels-per-class", "2"], "--labels-per-class does nothing in --mode seg-knn"),
    (["--mode", "linear", "--seg-res", "8"], "--seg-res does nothing in --mode linear"),
    (["--mode", "linear", "--epochs", "0"], "--epochs 0: --mode linear trains for at least 1 epoch"),
    (["--mode", "knn", "--subset", "10"], "unrecognized arguments: --subset 10"),
    (["--mode", "knn", "--resume", "auto"], "unrecognized arguments: --resume auto"),
    (["--mode", "knn", "--coarse-map", "m.json"], "--coarse-map is for --granularity coarse"),
    (["--mode", "knn", "--granularity", "coarse", "--coarse-map", "m.json"],
     "--coarse-map does nothing with --data synthetic, which has its own coarse classes"),
    (["--mode", "linear", "--bn-head", "--batch-size", "1"],
     "BatchNorm in training (--bn-head) needs at least 2"),
    (["--mode", "finetune", "--batch-size", "1"], "BatchNorm in training (--mode finetune of resnet18)"),
    (["--mode", "knn", "--pretrained", os.path.dirname(os.path.abspath(__file__))],
     "is a folder: give its checkpoint.pth or backbone.pth"),
])
def test_a_flag_that_does_nothing_in_the_mode_is_refused_and_nothing_written(flags, expected, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        E.main([*BASE, *flags, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_labels_per_class_gives_no_class_more_than_k():
    """A class short of K keeps all its images and the others K each (not the short class's share); where
    every class has K, the set is the first K x classes of the balanced order, as before."""
    labels = [0] * 2 + [1] * 10 + [2] * 7
    keep = E.labeled(labels, 4, seed=0)
    assert collections.Counter(labels[i] for i in keep) == {0: 2, 1: 4, 2: 4} and keep == sorted(keep)
    labels = list(np.random.default_rng(0).permutation([0] * 5 + [1] * 9 + [2] * 12))
    for seed in (0, 1):
        assert E.labeled(labels, 4, seed) == sorted(E.common.balanced_order(labels, seed)[:4 * 3])


def class_folder(root, classes=("cat", "dog", "owl")):
    """root/{train,val}/<class>/*.png: 2 tiny images per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("mapping", [{"cat": 1, "dog": "pet", "owl": "bird"}, ["cat", "dog", "owl"],
                                     {"cat": ["pet"], "dog": "pet", "owl": "bird"}])
def test_a_coarse_map_that_is_not_names_to_names_is_refused_in_one_line(mapping, tmp_path, capsys):
    data, path = class_folder(tmp_path / "data"), tmp_path / "map.json"
    flags = ["--mode", "knn", "--data", str(data), "--granularity", "coarse", "--coarse-map", str(path),
             "--img-size", "32", "--stem", "small", "--batch-size", "2", "--workers", "0"]
    path.write_text(json.dumps({"cat": "pet", "dog": "pet", "owl": "bird"}))
    rec = E.main([*flags, "--output-dir", str(tmp_path / "ok")])  # names to names: two coarse classes
    assert "coarse labels" in rec["protocol"] and rec["val_images"] == 6
    path.write_text(json.dumps(mapping))
    with pytest.raises(SystemExit) as e:
        E.main([*flags, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "must be a JSON object {class folder name" in err[0], err


def test_help_lists_no_pretraining_only_flag(capsys):
    with pytest.raises(SystemExit):
        E.main(["--help"])
    text = capsys.readouterr().out
    assert "--labels-per-class" in text
    for flag in ("--resume", "--subset", "--knn-every", "--save-epochs", "--gpu-aug"):
        assert flag + " " not in text and flag + "\n" not in text, flag


def test_a_backbone_of_another_arch_is_named_in_one_line_of_our_own(tmp_path, capsys):
    import torch
    import common
    net, _ = common.build_backbone("resnet18", "small", 32)
    sd = net.state_dict()
    sd.pop("fc.weight", None)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:, :3]  # a layer of another shape
    del sd["layer4.1.bn2.bias"]
    torch.save(sd, tmp_path / "b.pth")
    with pytest.raises(SystemExit) as e:
        E.main(["--mode", "knn", *BASE, "--pretrained", str(tmp_path / "b.pth"),
                "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "1 weights missing (first: layer4.1.bn2.bias)" in err[0] and "weights of another shape" in err[0]
    assert "weights_only" not in err[0] and "Error(s)" not in err[0]


def test_a_checkpoint_whose_args_is_not_a_dict_is_not_a_compatible_checkpoint(tmp_path, capsys):
    import torch
    torch.save({"model": {}, "args": None}, tmp_path / "c.pth")
    with pytest.raises(SystemExit) as e:
        E.main(["--mode", "knn", *BASE, "--pretrained", str(tmp_path / "c.pth"),
                "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "is not a compatible checkpoint" in err[0], err


def test_a_linear_summary_names_the_mode_the_file_and_the_pretraining_method(tmp_path):
    """As knn's and seg's: mode, pretrained, arch, and method = the method that pretrained the backbone."""
    import torch
    import common
    net, _ = common.build_backbone("resnet18", "small", 32)
    sd = net.state_dict()
    sd._metadata["effssl"] = {"method": "mocov3", "arch": "resnet18", "stem": "small", "img_size": 32}
    torch.save(sd, tmp_path / "b.pth")
    out = tmp_path / "o"
    rec = E.main(["--mode", "linear", *BASE, "--pretrained", str(tmp_path / "b.pth"), "--epochs", "1",
                  "--max-steps", "1", "--output-dir", str(out)])
    want = {"mode": "linear", "pretrained": str(tmp_path / "b.pth"), "arch": "resnet18", "method": "mocov3"}
    assert {k: rec.get(k) for k in want} == want, rec
    logged = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert logged["event"] == "summary" and logged["method"] == "mocov3"


def test_help_of_a_dense_mode_lists_the_preset_values_it_runs_with(capsys):
    """One preset table: --mode seg-knn --help shows the dense values (448 px, the small stem, 1280 images,
    k = 5) that a dense run takes, and --mode knn --help the classification values."""
    for mode, shown, hidden in (("seg-knn", ["imagenet: 448", "cpu: small", "cpu: 1280", "cpu: 5"], []),
                                ("knn", ["cpu: 64"], ["imagenet: 448", "cpu: small", "cpu: 5"])):
        with pytest.raises(SystemExit):
            E.main(["--mode", mode, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(s in text for s in shown) and not any(s in text for s in hidden), (mode, text)


class Stop(Exception):
    """Raised in place of setting up the run: the parsed Args, nothing written."""


def test_an_explicit_flag_wins_over_the_dense_preset_even_abbreviated(tmp_path, monkeypatch):
    """argparse takes an unambiguous prefix of a flag (--img for --img-size): the dense preset must not
    replace what the flag says, nor the size be doubled to an 8x8 grid (32 px: 4x4)."""
    def stop(args, method):
        raise Stop(args)
    monkeypatch.setattr(E.common, "setup", stop)
    for flags, size in ((["--img", "96"], 96), (["--img", "32"], 32), (["--img-size=48"], 48), ([], 64)):
        with pytest.raises(Stop) as e:
            E.main(["--mode", "seg", *flags, "--output-dir", str(tmp_path)])
        assert e.value.args[0].img_size == size and e.value.args[0].stem == "small", flags
