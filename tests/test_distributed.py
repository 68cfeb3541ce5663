"""Distributed equivalence with a real 2-process torchrun (gloo, CPU): one launch of tests/dist_harness.py
alone and one under torchrun cover every method (see the harness docstring for what each part checks; the
`harness` fixture is in conftest.py, and test_eval_dense.py reads eval_linear's part of it)."""
import json

import pytest

METHODS = ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")


@pytest.mark.parametrize("name", ["step_mocov3", "step_fast_moco", "step_densecl", "detcon_loss",
                                  "fast_moco_loss"])
def test_two_processes_equal_one_process(harness, name):
    """Same global batch: rank-averaged loss, updated weights (and DenseCL's queues) as one process."""
    one, two = harness[1][name], harness[2][name]
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_a_folder_in_use_stops_every_rank_with_one_line_exit_2(harness):
    """Rank 0 is refused the lock: every rank stops with the same line, and nothing is written."""
    for rank, view in enumerate(harness[2]["per_rank_runs"]):
        locked = view["run_locked"]
        assert locked["code"] == 2 and len(locked["stderr"]) == 1, (rank, locked)
        assert locked["stderr"][0].startswith("error: --output-dir ") and "in use by another run" in \
            locked["stderr"][0], (rank, locked)
    assert harness[2]["per_rank_runs"][0]["run_locked"]["files"] == [".lock"]


def test_shuffle_bn_crosses_ranks_and_restores_order(harness):
    assert harness[2]["shuffle_bn"] == {"restored": True, "foreign": True}


@pytest.mark.parametrize("method", [*METHODS, "mocov3_device"])
def test_torchrun_runs_every_script_and_only_rank_0_reports(harness, method):
    views = harness[2]["per_rank_runs"]
    assert len(views) == 2
    lines = views[0][f"run_{method}"]["summary_lines"]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2
    assert views[1][f"run_{method}"]["summary_lines"] == []  # rank 1 neither prints nor logs
    assert views[0][f"run_{method}"]["world_size"] == 2 and views[0][f"run_{method}"]["backbone"]


def test_batch_not_divisible_by_world_is_one_line_exit_2(harness):
    bad = harness[2]["bad_batch"]
    assert (bad["code"] == 2 and len(bad["stderr"]) == 1
            and "not divisible by the world size 2" in bad["stderr"][0])


def test_held_split_sharded_by_rank_sees_each_image_once_per_epoch(harness):
    """--data-on-device under torchrun: the two ranks' batches of an epoch (global batch 8, 24 images) hold
    every image exactly once, each rank 4 per batch, and the two epochs differ in order."""
    ranks = harness[2]["held_epochs"]
    assert len(ranks) == 2
    orders = []
    for epoch in (0, 1):
        batches = [ranks[r][epoch] for r in (0, 1)]
        assert all(len(b) == 4 for r in batches for b in r) and len(batches[0]) == len(batches[1]) == 3
        flat = [i for r in batches for b in r for i in b]
        assert sorted(flat) == list(range(24))
        orders.append(flat)
    assert orders[0] != orders[1]
    alone = harness[1]["held_epochs"][0]  # one process: the same images per epoch, all in its batches
    assert all(sorted(i for b in alone[e] for i in b) == list(range(24)) for e in (0, 1))
