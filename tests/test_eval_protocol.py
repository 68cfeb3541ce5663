"""eval_linear's result line says what ran, and flags that do nothing in a mode are refused."""
import pytest

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
])
def test_a_flag_that_does_nothing_in_the_mode_is_refused_and_nothing_written(flags, expected, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        E.main([*BASE, *flags, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()


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
