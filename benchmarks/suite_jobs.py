"""Jobs of benchmarks/gpu_suite.py: a script run in-process (`module.main(argv)`, its output captured), a
group of them in one child process, and the compiled model-only MoCo v3 step (no data).

A job is a dict: name, script (a training script, eval_linear.py, benchmarks/model_cost.py,
benchmarks/kernels.py, benchmarks/dense.py, or "model_only"), argv, dir (its folder: stdout.log, and
--output-dir for the training scripts), estimate_s (the job is not started with fewer seconds left before the
deadline). Its result: name, ok, skipped (stopped by the budget: not started, or killed_at_s set), summary
(the JSON summary line the script printed last; dense.py: its table), error (the output's tail when it
failed, or why it was not started), wall_s, started and ended (unix times). killed_at_s (set by the parent,
gpu_suite.launch): the seconds the job had from its start to the deadline it was killed at.

  python benchmarks/suite_jobs.py JOBS.json RESULTS.json   # the child: JOBS = {"deadline": unix time,
                                                          # "jobs": [...]}; RESULTS rewritten before and
                                                          # after each job (before: the job under way last,
                                                          # {name, running: true, started})
"""
import contextlib
import importlib
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import bench  # noqa: E402  (benchmarks/ is on the path)


def write_json(path, obj):
    """Write atomically: a reader (or a rerun after a kill) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def last_summary(text):
    """The last line of `text` that is a JSON object (every script ends with its summary line), or None."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(path, chars=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def call_main(script, argv):
    """module.main(argv) of a repository script; dense.py reads sys.argv and runs its evaluations through
    bench.run_summary (a process each): both are redirected into this process."""
    module = importlib.import_module(os.path.basename(script)[:-3])
    if module.__name__ != "dense":
        return module.main(argv)
    saved = sys.argv, module.run_summary
    sys.argv, module.run_summary = [script, *argv], inprocess_summary
    try:
        return module.main()
    finally:
        sys.argv, module.run_summary = saved


def inprocess_summary(script, args, cache_dir=None, reuse=False, env=None):
    """bench.run_summary, in this process: the same cache (a hash of the command) and the same failure."""
    cmd = [script, *map(str, args)]
    cache, stored = bench.cached(cmd, cache_dir, reuse)
    if stored:
        return stored
    out = cmd[cmd.index("--output-dir") + 1] if "--output-dir" in cmd else cache_dir or "."
    res = run_job({"name": os.path.basename(script), "script": script, "argv": cmd[1:], "dir": out,
                   "log": "stdout.log"})
    if not res["ok"]:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res['error']}")
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        write_json(cache, res["summary"])
    return res["summary"]


def run_job(job):
    """One job in this process -> its result. Nothing it raises escapes: a failure is a result."""
    import torch
    os.makedirs(job["dir"], exist_ok=True)
    log = os.path.join(job["dir"], job.get("log", "stdout.log"))
    threads, t, started = torch.get_num_threads(), time.perf_counter(), time.time()
    ok, error, summary = False, None, None
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            if job["script"] == "model_only":
                summary = model_only(job["argv"])
                print(json.dumps(summary), flush=True)
            else:
                call_main(job["script"], job["argv"])
            ok = True
        except SystemExit as e:  # the scripts' own exits: 0 / None is success
            ok = e.code in (0, None)
            error = None if ok else f"exit {e.code}"
        except Exception:  # noqa: BLE001 -- a failing run is recorded, the suite goes on
            traceback.print_exc()
            error = "exception"
    torch.set_num_threads(threads)  # kernels.py sets its own thread count
    text = tail(log, 10**7)
    if ok:
        if job["script"].endswith("dense.py"):
            argv = job["argv"]
            summary = {"table": tail(argv[argv.index("--out") + 1] + ".md", 10**6) if "--out" in argv else ""}
        else:
            summary = summary or last_summary(text)
            ok = summary is not None
            error = None if ok else "no JSON summary line"
    return {"name": job["name"], "ok": ok, "skipped": False, "summary": summary if ok else None,
            "error": None if ok else f"{error}: {text[-1500:]}", "wall_s": time.perf_counter() - t,
            "started": started, "ended": time.time()}


def model_only(argv):
    """Model-only MoCo v3 steps (forward + backward + optimizer step on one random batch, no data loading),
    as benchmarks/model_cost.py times them, optionally under torch.compile (model_cost has no compile switch):
    argv = the training flags + --reps N. Returns {step_ms, img_per_s, compile_s}."""
    import statistics

    import torch

    import common
    import mocov3
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else 20
    flags = [a for i, a in enumerate(argv) if a != "--reps" and (i == 0 or argv[i - 1] != "--reps")]
    args = common.parse_args(mocov3.Args, mocov3.PRESETS, flags)
    device = bench.cuda_device(args)
    run = common.Run(args, "model_only", 0, 1, device, "")
    torch.manual_seed(0)
    model = mocov3.MoCoV3(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()  # in place, as common.prepare_model does
    params = [p for p in model.parameters() if p.requires_grad]
    opt, scaler = common.build_optimizer(args, params, args.trust_coefficient), common.grad_scaler(run)
    x1, x2 = (run.to_device(torch.randn(args.batch_size, 3, args.img_size, args.img_size)) for _ in range(2))
    m = run.scalar(args.momentum)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with run.autocast():
            loss = model(x1, x2, m)
        common.optimizer_step(loss, opt, scaler)

    t = time.perf_counter()
    for _ in range(3):  # compilation, cudnn autotuning, the allocator
        step()
    sync()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    ms = statistics.median(times)
    return {"event": "summary", "step_ms": ms, "img_per_s": 1000 * args.batch_size / ms,
            "compile_s": compile_s, "compile": args.compile, "reps": reps, "batch_size": args.batch_size}


def not_started(job, left):
    """The result of a job not started: its estimate_s exceeds the `left` seconds before the deadline."""
    return {"name": job["name"], "ok": False, "skipped": True, "summary": None, "wall_s": 0.0,
            "ended": time.time(),
            "error": f"not started: needs ~{job.get('estimate_s', 0):.0f} s, {max(left, 0):.0f} s left"}


def run_jobs(jobs, deadline, done=lambda results: None):
    """Each job in turn, in this process, unless its estimate_s no longer fits before `deadline` (unix time);
    `done(results)` before each job (its last entry the job under way: {name, running, started}, so that a
    parent that kills this process knows which job it stopped and since when) and after each one."""
    results = []
    for job in jobs:
        left = deadline - time.time()
        if job.get("estimate_s", 0) > left:
            results.append(not_started(job, left))
        else:
            done(results + [{"name": job["name"], "running": True, "started": time.time()}])
            results.append(run_job(job))
        done(results)
    return results


def main(jobs_path, results_path):
    with open(jobs_path) as f:
        spec = json.load(f)
    run_jobs(spec["jobs"], spec["deadline"], lambda results: write_json(results_path, results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
