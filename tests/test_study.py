"""Data-study knobs (Cole et al. 2022): nested balanced subsets, deterministic corruptions, label budgets."""
import collections

import numpy as np
import pytest
import torch

import common
import eval_linear
import mocov3


def args_for(*argv):
    return common.parse_args(mocov3.Args, mocov3.PRESETS, ["--synthetic-size", "200", *argv])


def test_subsets_are_nested_and_class_balanced():
    small, big = (common.pretrain_base(args_for("--subset", str(n))) for n in (50, 120))
    assert len(small) == 50 and len(big) == 120
    assert set(small.indices) <= set(big.indices)
    assert set(collections.Counter(small.targets).values()) == {5}  # 10 classes x 5
    assert set(collections.Counter(big.targets).values()) == {12}
    other_seed = common.pretrain_base(args_for("--subset", "50", "--seed", "1"))
    assert set(other_seed.indices) != set(small.indices)  # seeded


def test_balanced_order_with_uneven_classes():
    labels = [0] * 10 + [1] * 3 + [2] * 6
    order = common.balanced_order(labels, seed=0)
    assert sorted(order) == list(range(19))
    first = collections.Counter(labels[i] for i in order[:9])
    assert first == {0: 3, 1: 3, 2: 3}


def test_domain_mix_fixed_total():
    base = common.pretrain_base(args_for("--data", "synthetic,synthetic", "--subset", "40",
                                         "--mix-fraction", "0.25"))
    assert len(base) == 40
    # domains apart
    assert sum(t < 10 for t in base.targets) == 10 and sum(t >= 10 for t in base.targets) == 30


def test_corruption_is_deterministic_per_index_across_epochs_and_workers():
    base = common.pretrain_base(args_for("--corrupt", "saltpepper:0.1,jpeg:20"))
    ds = common.Views(base, common.TwoViews(*mocov3.byol_augmentations(32, 0.2)))
    raw = [np.asarray(base[i][0]) for i in (3, 7)]
    assert np.array_equal(raw[0], np.asarray(base[3][0]))  # same stored image every time
    clean = np.asarray(common.Synthetic(200)[3][0])
    assert not np.array_equal(raw[0], clean)  # and it is really corrupted
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=[3, 7], num_workers=2)
    for epoch in (0, 1):
        ds.epoch = epoch
        got = [x[0] for (x, _), _ in loader]
        want = [ds[i][0][0] for i in (3, 7)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("spec,fraction", [("saltpepper:0.2", 0.2), ("saltpepper:0", 0.0)])
def test_saltpepper_fraction(spec, fraction):
    img = common.Synthetic(1)[0][0]
    out = np.asarray(common.corrupt_image(img, common.parse_corruptions(spec), np.random.default_rng(0)))
    extreme = ((out == 0).all(-1) | (out == 255).all(-1)).mean()
    assert extreme == pytest.approx(fraction, abs=0.03)


def test_downsample_lowers_resolution_at_the_same_size():
    img = common.Synthetic(1)[0][0]
    out = common.corrupt_image(img, [("downsample", 4.0)], None)
    a = np.asarray(out).astype(float)
    assert out.size == img.size
    assert np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(np.asarray(img).astype(float), axis=1)).mean()


def test_evaluation_data_is_never_corrupted():
    a = args_for("--corrupt", "blur:3", "--knn-every", "1")
    train, val = common.knn_monitor(a, common.Run(a, "mocov3", 0, 1, torch.device("cpu"), "/tmp"))
    clean = common.Synthetic(200, "val")
    assert np.array_equal(np.asarray(val.base[0][0]), np.asarray(clean[0][0]))
    assert np.array_equal(np.asarray(train.base[0][0]), np.asarray(common.Synthetic(200)[0][0]))


def test_labels_per_class_picks_k_per_class():
    a = common.parse_args(eval_linear.Args, eval_linear.PRESETS,
                          ["--synthetic-size", "200", "--labels-per-class", "3"])
    train, val = eval_linear.eval_splits(a)
    assert len(train) == 30 and set(collections.Counter(train.targets).values()) == {3}
    assert len(val) == 40  # val is untouched


def test_coarse_granularity_on_synthetic():
    a = common.parse_args(eval_linear.Args, eval_linear.PRESETS,
                          ["--synthetic-size", "20", "--granularity", "coarse"])
    train, _ = eval_linear.eval_splits(a)
    names = sorted(set(eval_linear.SYNTHETIC_COARSE.values()))
    for i in range(20):
        assert names[train.targets[i]] == eval_linear.SYNTHETIC_COARSE[common.SHAPES[i % 10]]


@pytest.mark.parametrize("spec", ["jpeg:0", "downsample:-1", "sharpen:2", "jpeg:abc"])
def test_bad_corruption_spec_is_one_line_exit_2(spec, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mocov3.main(["--corrupt", spec, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and spec in err[0], err
