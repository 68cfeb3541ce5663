"""What a user does by mistake to a run never silently loses or corrupts it (issue 27): a second run into a
run's folder, a refused command, Ctrl-C, a NaN, a resume with other flags or data, a CPU without a preset, a
file that is not a checkpoint, and a finished run run again. Each test is named after the item it covers."""
import dataclasses
import fractions
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import PREEMPT, ROOT, losses, read_log, tiny

mocov3 = importlib.import_module("mocov3")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(folder, argv) of a finished 1-step MoCo v3 run: tests change a copy (copy_of)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = tiny("mocov3", out, "--synthetic-size", "16", "--max-steps", "1")
    mocov3.main(argv)
    yield out, argv
    shutil.rmtree(out.parent)


def copy_of(finished, tmp_path):
    """A copy of the finished run in tmp_path/run and its argv pointing there."""
    out, argv = finished
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    return dst, [str(dst) if a == str(out) else a for a in argv]


def snapshot(folder):
    """Every file under `folder` -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(capsys, script, argv):
    """main(argv) of `script` must stop with exit code 2 and one stderr line: that line."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def logged_steps(out):
    return [r["step"] for r in read_log(out) if "img_per_s" in r and r.get("event") != "summary"]


def image_folder(root, names):
    """An ImageFolder of 8x8 noise PNGs: class folder a/ or b/ alternately, one file per name."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / name)
    return root


def test_item2_a_fresh_run_into_a_runs_folder_stops_unless_overwrite(finished, tmp_path, capsys):
    """The same command twice: the second stops (one line, exit 2, the folder untouched) and says how to go
    on; an evaluation into a training run's folder too. --overwrite starts over: the old log is gone."""
    out, argv = copy_of(finished, tmp_path)
    before = snapshot(out)
    err = refused(capsys, "mocov3", argv)
    assert err == (f"error: --output-dir {out} holds a run (checkpoint.pth and backbone.pth): continue it "
                   "with --resume auto, use another --output-dir, or --overwrite to start over there")
    err = refused(capsys, "eval_linear", ["--pretrained", "none", "--mode", "knn", "--synthetic-size", "16",
                                          "--img-size", "32", "--workers", "0", "--output-dir", out])
    assert f"--output-dir {out} holds a training run" in err
    assert snapshot(out) == before
    mocov3.main([*argv, "--overwrite", "--max-steps", "1"])
    assert logged_steps(out) == [1] and len([r for r in read_log(out) if r.get("event") == "summary"]) == 1
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 1


def test_item3_a_refused_command_writes_nothing(finished, tmp_path, capsys):
    """Refusals found after setup (the data) leave a finished run's folder byte-identical (args.json, log,
    lock, checkpoints: --overwrite deletes nothing before every check has passed) and create no new folder."""
    out, argv = copy_of(finished, tmp_path)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    before = snapshot(out)
    empty = ["--data", tmp_path / "empty", "--preset", "cpu"]  # --preset: the synthetic run's, on a GPU too
    for more in (["--resume", "auto", *empty], ["--overwrite", *empty],
                 ["--overwrite", "--batch-size", "32"]):
        err = refused(capsys, "mocov3", [*argv, *more])
        assert "no images found" in err or "larger than the dataset" in err, err
        assert snapshot(out) == before, more
    refused(capsys, "mocov3", tiny("mocov3", tmp_path / "new", *empty))
    assert not (tmp_path / "new").exists()


def test_item5_ctrl_c_checkpoints_the_step_and_resume_matches(uninterrupted, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group) after step 1 is logged: the step
    finishes, checkpoint.pth holds it, exit PREEMPTED_EXIT without a traceback, and the resumed run's losses
    are the uninterrupted run's."""
    out = tmp_path / "pre"
    argv = tiny("mocov3", out, *PREEMPT)
    # the same intra-op threads as this process, which runs the resume and the reference: the float sums match
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "mocov3.py"), *argv], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in p.stdout:
        if " step 1/3 " in line:
            os.killpg(p.pid, signal.SIGINT)
            break
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == common.PREEMPTED_EXIT, stderr[-2000:]
    assert "stopped: SIGINT at step" in stderr and "Traceback" not in stderr, stderr
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 1 <= ck["step"] < 3 and ck["step"] == logged_steps(out)[-1]
    mocov3.main([*argv, "--resume", "auto"])
    assert losses(out) == pytest.approx(uninterrupted("mocov3"), rel=1e-6, abs=1e-7)


def test_item5_a_second_ctrl_c_or_one_before_training_exits_at_once(capfd):
    """In training, the first Ctrl-C waits for the step's end and says so; the second exits at once: one
    line, exit 130 (no KeyboardInterrupt traceback). Before the training loop there is nothing to save."""
    before = signal.getsignal(signal.SIGINT)
    try:
        common.catch_stop_signals()
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)  # before resume(): data and model are still being built
        assert e.value.code == common.INTERRUPTED_EXIT
        common.catch_stop_signals()
        common.STOP_AT_STEP[0] = True  # as resume() sets it: the training loop is next
        os.kill(os.getpid(), signal.SIGINT)
        assert common.STOP_SIGNAL[0] == "SIGINT"  # noted: end_of_step checkpoints and stops
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.code == common.INTERRUPTED_EXIT
    finally:
        common.restore_signal_handlers()
    assert capfd.readouterr().err.strip().splitlines() == [
        "interrupted: exiting at once",
        "interrupted: finishing this step, then writing checkpoint.pth (Ctrl-C again to exit at once)",
        "interrupted: exiting at once, losing the steps since the last checkpoint"]
    assert signal.getsignal(signal.SIGINT) is before  # main() over: the Ctrl-C of pytest or a notebook


def test_item6_the_nan_stop_names_only_a_checkpoint_this_run_wrote(finished, tmp_path, monkeypatch, capsys):
    """A NaN at step 1 of a run started over in an old run's folder: no checkpoint of this run (never the old
    run's file). A NaN after this run saved step 1: that checkpoint, which the NaN state does not replace."""
    out, argv = copy_of(finished, tmp_path)
    log_step = common.Logger.log_step

    def diverging(self, loss, **metrics):
        return log_step(self, torch.tensor(float("nan")) if self.step == 0 else loss, **metrics)

    monkeypatch.setattr(common.Logger, "log_step", diverging)
    with pytest.raises(SystemExit) as e:
        mocov3.main([*argv, "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == [
        "error: loss is nan at step 1; this run wrote no checkpoint before it"]
    monkeypatch.setattr(common.Logger, "log_step", log_step)
    args = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--log-every", "1"])
    run = common.Run(args, "mocov3", 0, 1, torch.device("cpu"), str(tmp_path / "unit"))
    os.makedirs(run.out)
    log = common.Logger(run, steps_per_epoch=4, start_step=0)
    log.log_step(torch.tensor(1.0))
    common.save_checkpoint(run, log, {})
    with pytest.raises(FloatingPointError) as e:
        log.log_step(torch.tensor(float("nan")))
    assert str(e.value) == (f"loss is nan at step 2; the last good checkpoint is {run.out}/checkpoint.pth "
                            "(step 1), never overwritten by this state")
    common.save_checkpoint(run, log, {})
    assert torch.load(tmp_path / "unit" / "checkpoint.pth", weights_only=True)["step"] == 1


def test_item7_resume_refuses_what_changes_a_step_and_allows_the_rest(finished, tmp_path, capsys):
    """Another image size, synthetic size, schedule length or data folder is refused by name with both values;
    changing how often it logs and saves, and where it stops, is a resume (its steps follow on)."""
    out, argv = copy_of(finished, tmp_path)
    before = snapshot(out)
    for flag, value, key, have in (("--img-size", 16, "img_size", 32), ("--epochs", 5, "epochs", 3),
                                   ("--synthetic-size", 24, "synthetic_size", 16)):
        err = refused(capsys, "mocov3", [*argv, "--resume", "auto", flag, value])
        assert f"it was made with {key}={have}, this run has {key}={value} ({flag} changes" in err, err
    other = image_folder(tmp_path / "other", [f"{i}.png" for i in range(16)])
    err = refused(capsys, "mocov3", [*argv, "--resume", "auto", "--data", other, "--preset", "cpu"])
    assert "it was made on 16 images (fingerprint" in err and f"--data {other} has 16 images" in err, err
    assert snapshot(out) == before
    mocov3.main([*argv, "--resume", "auto", "--max-steps", "2", "--log-every", "2", "--save-epochs", "2",
                 "--time-limit", "600"])
    assert logged_steps(out) == [1, 2]


def test_item7_synthetic_size_is_compared_only_when_the_run_reads_synthetic_data(tmp_path):
    """--synthetic-size means nothing to a run on a folder: a resume there must not be refused by it."""
    folder = str(image_folder(tmp_path / "f", ["0.png", "1.png"]))
    made = dataclasses.asdict(mocov3.Args(data=folder, synthetic_size=16))
    torch.save({"model": {}, "args": made, "method": "mocov3"}, tmp_path / "ck.pth")
    args = mocov3.Args(data=folder, synthetic_size=999, resume=str(tmp_path / "ck.pth"))
    assert common.find_checkpoint(args, "mocov3")[0] == str(tmp_path / "ck.pth")
    with pytest.raises(common.BadInput, match="it was made with synthetic_size=16"):
        common.find_checkpoint(dataclasses.replace(args, data=f"{folder},synthetic"), "mocov3")


def test_item7_the_data_fingerprint_follows_the_files_not_the_path(tmp_path):
    names = [f"{i}.png" for i in range(6)]
    fingerprint = lambda root: common.pretrain_base(mocov3.Args(data=str(root))).data_id  # noqa: E731
    a = fingerprint(image_folder(tmp_path / "a", names))
    shutil.copytree(tmp_path / "a", tmp_path / "staged" / "a")  # a job's copy on local disk: the same data
    assert fingerprint(tmp_path / "staged" / "a") == a
    assert fingerprint(image_folder(tmp_path / "b", ["x" + n for n in names])) != a  # other files, same count
    assert a.startswith("6 images (fingerprint ")


def test_item8_without_a_gpu_a_folder_gets_the_cpu_preset_and_fp16_is_refused(tmp_path, monkeypatch, capsys):
    folder = str(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--data", folder])
    assert (args.preset, args.arch, args.img_size, args.batch_size) == ("cpu", "resnet18", 64, 32)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"no GPU: --preset auto picked the cpu preset for --data {folder} (a recipe sized for a CPU); "
        "--preset imagenet forces the ImageNet recipe"]
    forced = common.parse_args(mocov3.Args, mocov3.PRESETS, ["--data", folder, "--preset", "imagenet"])
    assert forced.arch == "resnet50" and capsys.readouterr().out == ""
    err = refused(capsys, "mocov3", tiny("mocov3", tmp_path / "run", "--precision", "fp16"))
    assert err.startswith("error: --precision fp16 needs a CUDA GPU") and not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.parse_args(mocov3.Args, mocov3.PRESETS, ["--data", folder]).preset == "imagenet"


def test_item11_checkpoint_read_errors_are_one_line_of_our_own(finished, tmp_path, capsys):
    """A truncated checkpoint, a pickle holding an arbitrary object and a checkpoint whose model does not fit:
    one line in our words, never PyTorch's text or its advice to load with weights_only=False."""
    src = finished[0] / "checkpoint.pth"
    data = src.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    torch.save({"model": {}, "args": {}, "extra": fractions.Fraction(1, 3)}, tmp_path / "object.pth")
    ck = torch.load(src, weights_only=True)
    ck["model"]["predictor.0.weight"] = torch.zeros(3, 3)
    torch.save(ck, tmp_path / "misfit.pth")
    damaged = "is not a checkpoint written by these scripts (it is a zip archive / pickle, but damaged"
    for name, expected in (("truncated", damaged), ("object", damaged),
                           ("misfit", "its model does not fit this run's (1 of another shape, e.g. "
                                      "predictor.0.weight [3, 3] here [64, 256])")):
        err = refused(capsys, "mocov3", tiny("mocov3", tmp_path / "run", "--synthetic-size", "16",
                                             "--resume", tmp_path / f"{name}.pth"))
        assert expected in err and "weights_only" not in err and "Error(s)" not in err, err
    assert not (tmp_path / "run").exists()


def test_item12_a_finished_runs_rerun_says_so_and_appends_no_summary(finished, tmp_path, capsys):
    out, argv = copy_of(finished, tmp_path)
    log = (out / "log.jsonl").read_bytes()
    capsys.readouterr()
    mocov3.main([*argv, "--resume", "auto"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"nothing to train: {out} holds a finished run (step 1 of 1); its summary:"
    rec = json.loads(lines[-1])
    assert rec["event"] == "summary" and rec["steps"] == 1 and isinstance(rec["loss"], float)
    assert (out / "log.jsonl").read_bytes() == log  # no summary with "loss": null appended


def test_item12_workers_help_shows_one_default(capsys):
    with pytest.raises(SystemExit):
        mocov3.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    workers = text[text.index("--workers INT data loader"):]  # its entry, not the usage line
    workers = workers[:workers.index("]") + 1]
    assert workers.count("default") == 1, workers
    assert f"[default: {common.default_workers()} on this machine; cpu: 2]" in workers, workers


def test_item12_nearly_constant_curves_are_drawn_flat_without_an_offset(tmp_path, monkeypatch):
    """A momentum of 0.99 with float noise: no "+9.9e-1" offset label, y-limits of +-5 %, not a steep slope;
    a varying loss keeps matplotlib's own limits."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig) or savefig(fig, *a, **kw))
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 4.0 - 0.5 * s, "momentum": 0.99 + 1e-9 * (s % 2)})
                           + "\n" for s in range(1, 6)))
    common.plot_curves(str(log), str(tmp_path / "curves.png"))
    axes = {ax.get_title(): ax for ax in drawn[0].axes}
    assert axes["momentum"].yaxis.get_offset_text().get_text() == ""
    low, high = axes["momentum"].get_ylim()
    assert low < 0.95 and high > 1.03
    low, high = axes["loss"].get_ylim()
    assert 1.0 < low < 1.5 and 3.5 < high < 4.0


def test_a_method_names_the_flags_a_resume_may_change(tmp_path):
    """DetCon's --mask-cache is its Args' RESUME_FREE: a resume may change it, not --fh-sigma."""
    detcon = importlib.import_module("detcon")
    saved = common.parse_args(detcon.Args, detcon.PRESETS, ["--output-dir", str(tmp_path)])
    torch.save({"method": "detcon", "model": {}, "args": {**dataclasses.asdict(saved), "mask_cache": "off"}},
               tmp_path / "checkpoint.pth")
    args = common.parse_args(detcon.Args, detcon.PRESETS, ["--output-dir", str(tmp_path), "--resume", "auto"])
    assert common.find_checkpoint(args, "detcon")[0] == str(tmp_path / "checkpoint.pth")
    args.fh_sigma = 0.5
    with pytest.raises(common.BadInput, match="fh_sigma=0.8, this run has fh_sigma=0.5"):
        common.find_checkpoint(args, "detcon")
