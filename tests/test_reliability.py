"""Runs that are interrupted, repeated or preempted, the per-method SyncBN choice, and bad flag values."""
import importlib
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import common
from conftest import PREEMPT, ROOT, TINY, losses, read_log, tiny

METHODS = ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")
# the official code of every method but DenseCL synchronises BN across GPUs; DenseCL's shuffle-BN needs
# per-GPU BN
OFFICIAL_SYNC_BN = {"mocov3": True, "fast_moco": True, "densecl": False, "detcon": True, "rotation_aux": True}


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Training scripts run in-process here install SIGTERM/SIGUSR1 handlers: put the defaults back."""
    yield
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_each_method_chooses_sync_bn_as_its_official_code(method, tmp_path, monkeypatch):
    mod = importlib.import_module(method)
    seen = {}

    def recording(model, run, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(common, "prepare_model", recording)
    with pytest.raises(_Stop):
        mod.main(tiny(method, tmp_path / "run", "--max-steps", "1"))
    assert seen.get("sync_bn") is OFFICIAL_SYNC_BN[method], seen


def test_sync_bn_only_on_multi_gpu_cuda():
    run = lambda world, dev: common.Run(None, "m", 0, world, torch.device(dev), "")  # noqa: E731
    assert common.use_sync_bn(True, run(2, "cuda"))
    assert not common.use_sync_bn(False, run(2, "cuda"))  # DenseCL on 8 GPUs: per-GPU BN
    assert not common.use_sync_bn(True, run(1, "cuda")) and not common.use_sync_bn(True, run(2, "cpu"))


@pytest.mark.parametrize("method", METHODS)
def test_preempted_resumed_and_finished(method, uninterrupted, tmp_path, monkeypatch, capsys):
    """SIGUSR1 (SLURM's --signal) arrives after step 1 is logged: a checkpoint at step 1 (mid-epoch), exit
    PREEMPTED_EXIT. `--resume auto` continues across the epoch boundary and its losses equal the
    uninterrupted run's (queues, masks, RNG and all). Rerunning the finished command with --resume auto
    trains no more: 0 steps logged, the checkpoint stays at step 3, a summary is printed."""
    mod, out = importlib.import_module(method), tmp_path / "pre"
    argv = tiny(method, out, *PREEMPT)
    log_step = common.Logger.log_step

    def signalling(self, *a, **kw):
        log_step(self, *a, **kw)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(common.Logger, "log_step", signalling)
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == common.PREEMPTED_EXIT
    assert "stopped: SIGUSR1 at step 1" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 1
    monkeypatch.setattr(common.Logger, "log_step", log_step)
    mod.main([*argv, "--resume", "auto"])
    assert "resumed from" in capsys.readouterr().out
    assert losses(out) == pytest.approx(uninterrupted(method), rel=1e-6, abs=1e-7)
    mod.main([*argv, "--resume", "auto"])  # the finished run, again
    steps = [r["step"] for r in read_log(out) if "img_per_s" in r and r.get("event") != "summary"]
    assert steps == [1, 2, 3]  # nothing logged by the third run
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
    assert [r["steps"] for r in read_log(out) if r.get("event") == "summary"][-1] == 3


def test_sigterm_checkpoints_the_step_and_resume_matches(uninterrupted, tmp_path):
    """SIGTERM from outside after step 1 is logged, to the whole process group as torchrun (os.killpg) and
    SLURM send it, loader workers included: the step in flight finishes, checkpoint.pth holds it, the exit
    code is PREEMPTED_EXIT, and the resumed run's losses are the uninterrupted run's."""
    out = tmp_path / "pre"
    argv = tiny("mocov3", out, *PREEMPT)
    # the same intra-op threads as this process, which runs the resume and the reference: the float sums match
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "mocov3.py"), *argv, "--workers", "1"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own process group: the signal reaches it alone
    for line in p.stdout:
        if " step 1/3 " in line:
            os.killpg(p.pid, signal.SIGTERM)  # the training process and its loader worker
            break
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == common.PREEMPTED_EXIT, stderr[-2000:]
    assert "stopped: SIGTERM at step" in stderr and "Traceback" not in stderr, stderr
    logged = [r["step"] for r in read_log(out) if "img_per_s" in r]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 1 <= ck["step"] < 3 and ck["step"] == logged[-1]  # stopped at the step it logged last
    importlib.import_module("mocov3").main([*argv, "--resume", "auto"])
    assert losses(out) == pytest.approx(uninterrupted("mocov3"), rel=1e-6, abs=1e-7)


def test_a_loader_alive_at_exit_does_not_hang_the_exit():
    """Loader workers ignore SIGTERM (ignore_interrupts), which multiprocessing's exit sends its daemonic
    children before waiting for them: a loader still alive at exit must not hang the process."""
    code = ("import torch, common\n"
            "ds = torch.utils.data.TensorDataset(torch.arange(8))\n"
            "it = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, "
            "worker_init_fn=common.ignore_interrupts))\n"
            "print(len(next(it)[0]))\n")  # `it` is alive at exit, as a traceback a test keeps would hold it
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "2", p.stderr[-2000:]


def test_resume_after_a_crash_logs_each_step_once(uninterrupted, tmp_path, monkeypatch, capsys):
    """A crash (here an exception, as kill -9) after step 3 is logged, the last checkpoint at step 2 (the
    epoch end): the resumed run does step 3 again; log.jsonl: each step once, the uninterrupted losses."""
    mod, out = importlib.import_module("mocov3"), tmp_path / "crash"
    argv = tiny("mocov3", out, *PREEMPT)
    log_step = common.Logger.log_step

    def crashing(self, *a, **kw):
        log_step(self, *a, **kw)
        if self.step == 3:
            raise _Stop

    monkeypatch.setattr(common.Logger, "log_step", crashing)
    with pytest.raises(_Stop):
        mod.main(argv)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2
    monkeypatch.setattr(common.Logger, "log_step", log_step)
    mod.main([*argv, "--resume", "auto"])
    assert "dropped 1 record(s) after step 2" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out) if "img_per_s" in r and "step" in r] == [1, 2, 3]
    assert losses(out) == pytest.approx(uninterrupted("mocov3"), rel=1e-6, abs=1e-7)


BAD_VALUES = [
    (["--lr", "-0.1"], "--lr -0.1 is out of range"),
    (["--lr", "nan"], "--lr nan is out of range"),
    (["--knn-t", "0"], "--knn-t 0.0 is out of range"),
    (["--momentum", "1.5"], "--momentum 1.5 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--batch-size", "1"], "--batch-size 1 gives 1 image per process; training needs at least 2"),
    (["--workers", "-1"], "--workers -1 is out of range"),
    (["--log-every", "0"], "--log-every 0 is out of range"),
    (["--crop-min", "0"], "--crop-min 0.0 is out of range"),
    (["--mix-fraction", "2"], "--mix-fraction 2.0 is out of range"),
]


@pytest.mark.parametrize("argv,expected", BAD_VALUES, ids=[a[0] for a, _ in BAD_VALUES])
def test_bad_numeric_flag_one_line_exit_2(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module("mocov3").main(tiny("mocov3", tmp_path / "run", *argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("script", ["mocov3", "eval_linear"])
def test_bad_path_flags(script, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    cases = [(["--output-dir", str(tmp_path / "a_file")], "--output-dir"),
             (["--resume", str(tmp_path / "missing.pth")], "--resume"),
             (["--data", str(tmp_path / "nowhere")], "data path not found"),
             (["--data", str(tmp_path / "a_file")], f"--data {tmp_path / 'a_file'} is a file, not a folder")]
    if script == "eval_linear":
        cases = [(["--output-dir", str(tmp_path / "a_file")], "--output-dir"),
                 (["--pretrained", str(tmp_path / "missing.pth")], "missing.pth"),
                 (["--resume", "auto"], "unrecognized arguments: --resume auto")]
    base = (TINY if script == "mocov3"
            else ["--data", "synthetic", "--synthetic-size", "64", "--img-size", "32"])
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script).main([*base, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and expected in err[0], (argv, err)


# (script, flags, the start of the error line); `{file}`: an existing file, `{folder}`: an empty folder
BAD_OUTPUTS = [
    ("mocov3", ["--output-dir", "{file}/run"],
     "error: --output-dir {file}/run cannot be created: {file} is a file"),
    ("mocov3", ["--output-dir", "/proc/x"], "error: --output-dir /proc/x cannot be created"),
    ("detcon", ["--mask-cache", "{file}"], "error: --mask-cache {file} exists and is not a folder"),
    ("detcon", ["--show-masks", "{folder}"], "error: --show-masks {folder} is a folder"),
    ("densecl", ["--show-matches", "/nonexistent/dir/m.png"],
     "error: --show-matches /nonexistent/dir/m.png: its folder /nonexistent/dir does not exist"),
    ("eval_linear", ["--show-seg", "{file}/seg.png"], "error: --show-seg {file}/seg.png: its folder {file}"),
    ("detcon", ["--fh-sigma", "-1"], "error: --fh-sigma -1.0 is out of range: it must be >= 0"),
    ("detcon", ["--fh-scale", "-3"], "error: --fh-scale -3.0 is out of range: it must be >= 0"),
    ("detcon", ["--fh-min-size", "-3"], "error: --fh-min-size -3 is out of range: it must be >= 0"),
]


@pytest.mark.parametrize("script,flags,expected", BAD_OUTPUTS, ids=[f"{s} {f[0]}" for s, f, _ in BAD_OUTPUTS])
def test_bad_output_path_or_fh_value_one_line_exit_2_nothing_left(script, flags, expected, tmp_path, capsys):
    """Checked before any work: one line naming the flag, exit 2, and no file left behind (a --show-masks
    folder used to end in a traceback after training, with a *.tmp*.png left in it)."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    names = {"file": str(tmp_path / "a_file"), "folder": str(tmp_path / "folder")}
    flags = [f.format(**names) for f in flags]
    argv = (["--data", "synthetic", "--synthetic-size", "64", "--img-size", "32", "--workers", "0",
             "--mode", "seg", "--output-dir", str(tmp_path / "run"), *flags] if script == "eval_linear"
            else tiny(script, tmp_path / "run", *flags))
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(expected.format(**names)), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "folder"]
    assert not os.path.exists("/proc/x") and not os.path.exists("/nonexistent")


def test_a_picture_inside_the_new_output_dir_is_accepted_elsewhere_its_folder_must_exist(tmp_path):
    out = tmp_path / "run"  # not created yet: setup creates it after every check
    common.check_output_file("--show-seg", str(out / "masks.png"), str(out))
    with pytest.raises(common.BadInput, match="its folder .* does not exist"):
        common.check_output_file("--show-seg", str(tmp_path / "other" / "masks.png"), str(out))
    assert not out.exists()


def test_default_workers_never_exceed_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= common.CommonArgs().workers <= min(8, cores)


# ---------------------------------------------------------------------------- log.jsonl torn by a crash


def test_read_jsonl_skips_and_counts_torn_lines(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n7\n{"step": 4, "l')
    records, skipped = common.read_jsonl(str(path))
    assert [r["step"] for r in records] == [1, 3] and skipped == 3  # a torn line, a non-object, a torn tail
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 3" in err[0] and str(path) in err[0], err


@pytest.mark.parametrize("tail", ['{"step": 9, "lo', '{"step": 9}', '{"step": 9, "lo\n'])
def test_drop_torn_tail_keeps_whole_lines_only(tmp_path, tail):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n' + tail)
    assert common.drop_torn_tail(str(path)) == len(tail)
    assert path.read_text() == '{"step": 1}\n'
    assert common.drop_torn_tail(str(path)) == 0 and path.read_text() == '{"step": 1}\n'  # whole: untouched


def test_resume_after_a_torn_last_line_drops_it_and_plots(tmp_path, capsys):
    """A kill -9 mid-write leaves half a record at the end of log.jsonl: the resumed run truncates it before
    appending (otherwise its first record glues onto the fragment) and its curves.png is drawn."""
    out = tmp_path / "run"
    argv = tiny("mocov3", out, "--synthetic-size", "16")
    mocov3 = importlib.import_module("mocov3")
    mocov3.main([*argv, "--max-steps", "1"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 1.0, "lo')  # torn: no newline, not JSON
    os.remove(out / "curves.png")
    capsys.readouterr()
    mocov3.main([*argv, "--max-steps", "2", "--resume", "auto"])
    assert "dropped its torn last line" in capsys.readouterr().out
    log = read_log(out)  # every line parses
    assert [r["step"] for r in log if "img_per_s" in r and r.get("event") != "summary"] == [1, 2]
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- one run per output folder

# a process that, given a line on stdin, locks the folder argv[1] as a training run does, says so, and sleeps
HOLD = ("import sys, time; sys.path.insert(0, {root!r}); import common; sys.stdin.readline(); "
        "print(common.lock_output_dir(sys.argv[1]) or 'locked', flush=True); time.sleep(600)")


def test_a_locked_folder_refuses_a_second_run_and_a_killed_holder_frees_it(tmp_path, capsys):
    """Two runs on one folder corrupt each other: the second stops before writing anything, one line naming
    the folder and the holder (pid, host), exit 2, fresh or resumed. The OS drops the lock of a holder killed
    by SIGKILL (no clean-up of its own), so the next run (a requeued job) proceeds."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT), str(out)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # starts meanwhile
    try:
        argv = tiny("mocov3", out, "--synthetic-size", "16", "--max-steps", "1")
        mocov3 = importlib.import_module("mocov3")
        mocov3.main(argv)
        files = ("args.json", "log.jsonl", "checkpoint.pth", "backbone.pth")
        before = {f: (out / f).read_bytes() for f in files}
        holder.stdin.write("lock\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for extra in ([], ["--resume", "auto"]):
            with pytest.raises(SystemExit) as e:
                mocov3.main([*argv, *extra])
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1, err
            assert err[0].startswith(f"error: --output-dir {out} "), err
            assert f"in use by another run (pid {holder.pid} on {socket.gethostname()})" in err[0], err
        assert {f: (out / f).read_bytes() for f in files} == before
    finally:
        holder.kill()
        holder.wait()
    mocov3.main([*argv, "--resume", "auto"])  # the finished run again: no further training, not refused
    assert "resumed from" in capsys.readouterr().out
