"""benchmarks/gpu_suite.py: the dry run (every stage on the CPU at tiny sizes, every script in this process),
its rerun (finished stages skipped), the report (every table), the job runner's failures and skips, and the
pure planning functions at the GPU geometry."""
import json
import math
import os
import shutil
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_suite  # noqa: E402
import suite_jobs  # noqa: E402

STAGE_KEYS = {"smoke": {"runs", "overhead_s", "steps", "geometry"},
              "accuracy": {"epochs", "knn_every", "rows", "seed_pair", "geometry", "n_train", "n_val"},
              "speed": {"runs", "geometry", "links"}, "dense": {"table", "epochs", "methods", "command"}}
REPORT = ("gpu_smoke", "gpu_accuracy", "gpu_time_to_target", "gpu_throughput", "gpu_dense")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """(out, work, seconds, status lines) of one dry run; the run folders are removed afterwards."""
    out, work = tmp_path_factory.mktemp("suite"), tmp_path_factory.mktemp("work")
    t = time.perf_counter()
    ctx = gpu_suite.main(["--dry-run", "--out", str(out), "--work", str(work)])
    seconds = time.perf_counter() - t
    yield out, work, seconds, ctx
    shutil.rmtree(work, ignore_errors=True)


def finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_dry_run_writes_every_stage(dry):
    out, work, _, _ = dry
    bundle = json.load(open(out / "results.json"))
    assert {"device", "torch", "commit", "budget_s", "precision"} <= set(bundle["meta"])
    for stage, keys in STAGE_KEYS.items():
        result = json.load(open(out / f"{stage}.json"))
        assert result["status"] == "ok", (stage, result["headline"])
        assert keys <= set(result), (stage, keys - set(result))
        assert bundle["stages"][stage] == result
    smoke = bundle["stages"]["smoke"]["runs"]
    expected = {*gpu_suite.METHODS, "supervised", "mocov3 (loader)", "mocov3 --compile"}
    assert expected <= set(smoke)
    for name, r in smoke.items():
        assert r["ok"] and r["finite"] and finite(r["loss"]), (name, r.get("error"))
    rows = bundle["stages"]["accuracy"]["rows"]
    for name, _, _ in gpu_suite.ROWS:
        r = rows[name]
        assert r["ok"] and r["epochs"] == bundle["stages"]["accuracy"]["epochs"], (name, r.get("error"))
        if name == "supervised":
            assert 0 <= r["top1"] <= 100
        else:  # a kNN curve from log.jsonl, its last point the final kNN; a linear probe
            assert r["curve"] and r["curve"][-1][2] == r["knn_top1"] and 0 <= r["linear"] <= 100, name
    pair = bundle["stages"]["accuracy"]["seed_pair"]
    assert all(f"{n} seed 1" in rows and finite(rows[n]["seed1_knn"]) for n in pair)
    assert 0 <= rows["random init"]["knn_top1"] <= 100
    speed = bundle["stages"]["speed"]["runs"]
    assert all(r["ok"] for r in speed.values()) and "model-only --compile" in speed
    assert finite(speed["model_cost speed"]["step_ms"]["mocov3"])
    assert "| mocov3 |" in bundle["stages"]["dense"]["table"]
    # --out is the bundle only (the GPU machine returns at most 8 files, no folders needed); no checkpoints
    assert len(os.listdir(out)) <= 8 and all(f.is_file() for f in out.iterdir())
    assert (out / "gpu_knn_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(work.rglob("checkpoint.pth"))


def test_rerun_skips_finished_stages(dry, capsys):
    out, work, first, _ = dry
    capsys.readouterr()
    t = time.perf_counter()
    gpu_suite.main(["--dry-run", "--out", str(out), "--work", str(work)])
    seconds = time.perf_counter() - t
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[gpu_suite] ")]
    assert [ln.split()[1:3] for ln in lines[:4]] == [[s, "done"] for s in gpu_suite.STAGES], lines
    assert seconds < min(5.0, first / 3), (seconds, first)


def test_report_writes_every_table(dry, tmp_path):
    out = dry[0]
    paths = gpu_suite.main(["--report", str(out), "--results-dir", str(tmp_path)])
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted([f"{n}.md" for n in REPORT] + ["gpu_knn_time.png"])
    text = {n: (tmp_path / f"{n}.md").read_text() for n in REPORT}
    meta = json.load(open(out / "results.json"))["meta"]
    for name, body in text.items():
        assert meta["device"] in body and meta["commit"] in body and "DRY RUN" in body, name
    for name, _, _ in gpu_suite.ROWS:
        assert f"| {name} | 1 |" in text["gpu_accuracy"], name
    assert "| VICReg | 76.3 | 84.5 |" in text["gpu_accuracy"]  # lightly's table beside ours
    assert "| mocov3 |" in text["gpu_time_to_target"]
    for what, _, target, _ in gpu_suite.targets(json.load(open(out / "results.json"))["stages"]):
        assert f"| {what} | " in text["gpu_throughput"] and f" | {target} | " in text["gpu_throughput"]
    assert "| mocov3 PIL loader | yes |" in text["gpu_throughput"]
    assert "| random init |" in text["gpu_dense"]


def test_a_failing_or_late_job_is_recorded_and_the_rest_run(tmp_path):
    bad = {"name": "bad", "script": "mocov3.py", "argv": ["--no-such-flag"], "dir": str(tmp_path / "bad")}
    late = {"name": "late", "script": "mocov3.py", "argv": [], "dir": str(tmp_path / "late"),
            "estimate_s": 60}
    seen = []
    bad_r, late_r = suite_jobs.run_jobs([bad, late], time.time() + 30,
                                        lambda res: seen.append([r.get("running", False) for r in res]))
    assert not bad_r["ok"] and not bad_r["skipped"] and "--no-such-flag" in bad_r["error"]
    assert not late_r["ok"] and late_r["skipped"] and "not started" in late_r["error"]
    # before a job: its entry marked running (what a parent that kills the process reads); after it: done
    assert seen == [[True], [False], [False, False]] and not (tmp_path / "late").exists()


def test_planning_at_the_gpu_geometry():
    assert gpu_suite.epochs_for(100, {"a": 1.0, "b": 3.0}, 10) == 20  # (100 - 2 x 10) // 4
    assert gpu_suite.epochs_for(10, {"a": 1.0}, 20) == 1  # at least one
    assert gpu_suite.epochs_for(1000, {"a": 1.0}, 0, hi=7) == 7
    assert gpu_suite.closest_pair({"a": 50.0, "b": 61.0, "c": 58.5, "d": 70.0}) == ("c", "b")
    assert gpu_suite.closest_pair({"a": 1.0}) is None
    curve = lambda *knn: [[e + 1, 10.0 * (e + 1), k] for e, k in enumerate(knn)]  # noqa: E731
    rows = {"x": {"ok": True, "seed": 0, "curve": curve(20, 40, 45)},
            "y": {"ok": True, "seed": 0, "curve": curve(30, 50, 60)},
            "x seed 1": {"ok": True, "seed": 1, "curve": curve(1, 2, 3)}}
    assert gpu_suite.time_to_target(rows) == (45, {"x": (30.0, 3), "y": (20.0, 2)})
    ctx = gpu_suite.Ctx(False, "out", "work", gpu_suite.GPU, 480, 0, {}, 15)
    flags = gpu_suite.train_flags(ctx, "mocov3.py", "data") + gpu_suite.row_flags(ctx, "mocov3", "mocov3.py",
                                                                                   [], 40)
    text = " ".join(map(str, flags))
    for part in ("--arch resnet18 --stem imagenet --img-size 128 --batch-size 256", "--channels-last",
                 "--data-on-device --store-size 160", "--preset imagenet", "--epochs 40 --save-epochs 40",
                 "--warmup-epochs 4"):
        assert part in text, part
    dense = " ".join(map(str, gpu_suite.row_flags(ctx, "mocov2", "densecl.py", ["--dense-weight", "0"], 40)))
    assert "--dense-weight 0" in dense and "--queue-size 4096 --momentum 0.99" in dense
    job = gpu_suite.job(ctx, "accuracy", "mocov3 seed 1", "mocov3.py", flags, 30.0, time_limit=52.3)
    assert job["argv"][-4:] == ["--output-dir", os.path.join("work", "accuracy", "mocov3_seed_1"),
                                "--time-limit", "52"]
    assert gpu_suite.run_key(job) == ["mocov3.py", *job["argv"][:-2]]  # the budget's time limit is not in it


def test_targets_read_the_measurements():
    stages = {"smoke": {"geometry": {"arch": "resnet18", "img": 128},
                        "runs": {"mocov3": {"img_per_s": 12000.0, "step_ms": 20.0}}},
              "speed": {"geometry": {"arch": "resnet50", "img": 224}, "runs": {
                  "model_cost accuracy": {"step_ms": {"mocov3": 19.0}},
                  "model_cost speed": {"step_ms": {"mocov3": 100.0}, "ratio": {"densecl": 1.08}},
                  "kernels": {"lars": [{"arch": "resnet50", "new_ms": 1.5}]},
                  "mocov3 --gpu-aug --compile": {"img_per_s": 990.0, "last_img_per_s": 950.0},
                  "model-only --compile": {"img_per_s": 1000.0}}}}
    values = [(round(v, 3) if v is not None else None, met) for _, v, _, met in gpu_suite.targets(stages)]
    assert values == [(12000.0, True), (None, None), (0.05, True), (0.95, True), (1.08, False), (None, None),
                      (0.015, True)]


def gpu_ctx(**kw):
    """A Ctx at the GPU geometry with the first run's measured process overhead (6 s on the H200)."""
    return gpu_suite.Ctx(False, "out", "work", gpu_suite.GPU, gpu_suite.BUDGET, 0, {"speed_links": "links"},
                         15, overhead=6.0, **kw)


def test_speed_stage_runs_the_compiled_pair_last():
    groups = gpu_suite.speed_jobs(gpu_ctx())
    names = [j["name"] for _, jobs in groups for j in jobs]
    compiled = [j["name"] for _, jobs in groups for j in jobs if "--compile" in j["argv"]]
    assert compiled == names[-2:] == [j["name"] for j in groups[-1][1]], names  # alone in the last process
    whole = ["mocov3 --gpu-aug", "mocov3 --data-on-device", "densecl --data-on-device",
             "mocov2 --data-on-device", "mocov3 PIL loader"]
    assert names[:len(whole)] == whole, names  # the uncompiled whole-script runs before everything else
    # the first run's compiled ResNet-50 job was still compiling when killed after 91 s
    assert all(j["estimate_s"] > 91 for j in groups[-1][1]), groups[-1][1]


def test_shares_give_every_stage_its_measured_time():
    """At the default budget, each stage's share holds what the first GPU run measured it to need."""
    ends = gpu_suite.stage_deadlines(gpu_suite.BUDGET, gpu_suite.STAGES)
    starts = [0.0] + [ends[s] for s in gpu_suite.STAGES[:-1]]
    length = {s: ends[s] - t for s, t in zip(gpu_suite.STAGES, starts)}
    assert math.isclose(ends["dense"], gpu_suite.BUDGET)
    assert length["smoke"] >= 76 + 5  # measured, and a margin
    ctx = gpu_ctx(stages={"smoke": {"runs": {"mocov3": {"ok": True, "img_per_s": 6641.0}}}})
    uncompiled = [j for label, jobs in gpu_suite.speed_jobs(ctx) if label != "compiled" for j in jobs]
    assert sum(j["estimate_s"] for j in uncompiled) <= length["speed"]
    methods, fixed, epochs = gpu_suite.dense_plan(ctx, length["dense"])
    assert len(methods) == 4 and epochs >= 3, (fixed, epochs)
    # a rerun spends its budget on the stages it runs
    assert gpu_suite.stage_deadlines(260, ["speed"], t0=10.0) == {"speed": 270.0}


def test_a_job_killed_at_the_deadline_is_reported_so():
    t0, jobs = 1000.0, [{"name": n} for n in ("a", "b", "c", "d")]
    finished = {"name": "a", "ok": True, "skipped": False, "summary": {}, "started": t0, "ended": t0 + 5.0,
                "wall_s": 5.0}
    # the child was stopped at t0 + 40 while running b; c and d never started
    res = gpu_suite.settle(jobs, [finished, {"name": "b", "running": True, "started": t0 + 5.0}], t0 + 40.0,
                           t0 + 40.5, "")
    assert res[0] == finished
    assert res[1]["skipped"] and res[1]["killed_at_s"] == 35 and "killed at the 35-s limit" in res[1]["error"]
    assert all(r["skipped"] and "killed_at_s" not in r and "not started" in r["error"] for r in res[2:])
    runs = {r["name"]: gpu_suite.run_row(r) for r in res}
    assert gpu_suite.problems(runs) == "; b killed at the 35-s limit; not started (budget): c, d"
    assert gpu_suite.state(runs["b"]) == "killed at the 35-s limit"
    assert gpu_suite.state(runs["c"]) == "not started"
    assert gpu_suite.outcome(runs) == "partial"  # a rerun tries them again
    # a run that failed before the stop stays failed; one the stop made fail (the SIGTERM) was killed
    failed = {**finished, "ok": False, "error": "exception", "ended": t0 + 3.0}
    stopped = {**finished, "name": "b", "ok": False, "error": "exception", "started": t0 + 3.0,
               "ended": t0 + 41.0}
    res = gpu_suite.settle(jobs[:2], [failed, stopped], t0 + 40.0, t0 + 40.0, "")
    assert [gpu_suite.state(r) for r in res] == ["failed", "killed at the 37-s limit"]
    # the child crashed under way (no stop): that job failed, the rest were not started and failed
    res = gpu_suite.settle(jobs[:2], [{"name": "a", "running": True, "started": t0}], t0 + 40.0, None,
                           "exit -9")
    assert [(r["skipped"], gpu_suite.killed_at(r)) for r in res] == [(False, None), (False, None)]
    assert "exit -9" in res[0]["error"] and "exit -9" in res[1]["error"]
    # the first GPU run's bundle marked its killed compiled job as not started, after 91 s of running
    assert gpu_suite.state({"ok": False, "skipped": True, "wall_s": 91.04}) == "killed at the 91-s limit"
    assert gpu_suite.state({"ok": False, "skipped": True, "wall_s": 0.0}) == "not started"


def test_the_child_killed_at_the_deadline_names_the_job_under_way(tmp_path, monkeypatch):
    """A real child process, stopped by SIGTERM at the deadline in the middle of a job."""
    (tmp_path / "sleeper.py").write_text("import time\n\n\ndef main(argv):\n    time.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    ctx = gpu_suite.Ctx(False, "out", str(tmp_path / "work"), gpu_suite.DRY, 10, time.monotonic(), {}, 0)
    jobs = [{"name": n, "script": "sleeper.py", "argv": [], "dir": str(tmp_path / n), "estimate_s": 0}
            for n in ("sleeper", "next")]
    t = time.time()
    sleeper, after = gpu_suite.launch(ctx, jobs, t + 2.0, "kill test")
    assert time.time() - t < 10
    assert sleeper["skipped"] and sleeper["killed_at_s"] in (1, 2), sleeper
    assert sleeper["error"].startswith(f"killed at the {sleeper['killed_at_s']}-s limit")
    assert after["skipped"] and gpu_suite.state(after) == "not started"
    # no process is started when no job's estimate fits the time left
    monkeypatch.setattr(gpu_suite, "launch", lambda *a: pytest.fail("a process started for nothing"))
    late = gpu_suite.execute(ctx, [{**jobs[0], "estimate_s": 60}], time.monotonic() + 5, "late")["sleeper"]
    assert late["skipped"] and late["error"].startswith("not started: needs ~60 s")
