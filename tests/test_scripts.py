"""Every training script, run as a user runs it: outputs contract, resume, torchrun, export, bad input."""
import json
import os

import pytest
import torch
import torchvision

from conftest import ROOT, TINY, losses, read_log, run_script, summary

METHODS = [m for m in ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
# methods that need a spatial map of >= 4x4 at 32 px use the CIFAR stem; DenseCL's queue fits the tiny batch
EXTRA = {"densecl": ["--stem", "small", "--queue-size", "64"], "detcon": ["--stem", "small"]}


def tiny(method, out, *more):
    return [*TINY, *EXTRA.get(method, []), "--output-dir", out, *more]


@pytest.mark.parametrize("method", METHODS)
def test_outputs_contract(method, tmp_path):
    out = str(tmp_path / "run")
    p = run_script(f"{method}.py", *tiny(method, out, "--max-steps", "4", "--knn-every", "1", "--knn-k", "20"))
    rec = summary(p)
    assert rec["method"] == method and rec["steps"] == 4
    for key in ("img_per_s", "step_ms", "peak_mem_mb", "loss", "knn_top1"):
        assert isinstance(rec[key], float) and rec[key] == rec[key], key  # present and not NaN
    assert 0 <= rec["knn_top1"] <= 100
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["method"] == method and args["world_size"] == 1 and args["img_size"] == 32 and "torch" in args
    log = read_log(out)
    steps = [r for r in log if "img_per_s" in r and r.get("event") != "summary"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"step", "epoch", "loss", "lr", "img_per_s", "data_time_frac", "peak_mem_mb"} <= set(r)
    assert any("knn_top1" in r for r in log)
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ck["method"] == method and ck["step"] == 4 and {"model", "optimizer", "rng"} <= set(ck)
    # backbone.pth: a plain state_dict of the online backbone, strict-loadable into the torchvision net
    sd = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    meta = sd._metadata["effssl"]
    assert meta["encoder"] == "online" and meta["method"] == method and meta["arch"] == "resnet18"
    net = torchvision.models.resnet18()
    if meta["stem"] == "small":
        net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)
    online = {k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    assert all(torch.equal(sd[k], online[k]) for k in sd)  # exported = online backbone, not the momentum one
    assert open(os.path.join(out, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"  # the run's picture


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(method, tmp_path):
    # 32 images / batch 8 = 4 steps per epoch: the resume at step 3 is mid-epoch, step 6 crosses an epoch
    common = ["--synthetic-size", "32", "--epochs", "3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_script(f"{method}.py", *tiny(method, a, *common, "--max-steps", "6"))
    run_script(f"{method}.py", *tiny(method, b, *common, "--max-steps", "3"))
    p = run_script(f"{method}.py", *tiny(method, b, *common, "--max-steps", "6", "--resume", "auto"))
    assert "resumed from" in p.stdout
    la, lb = losses(a), losses(b)
    assert len(la) == 6 and len(lb) == 6
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_processes(method, tmp_path):
    out = str(tmp_path / "ddp")
    p = run_script(f"{method}.py", *tiny(method, out, "--max-steps", "2"), torchrun=2)
    lines = [line for line in p.stdout.splitlines() if line.startswith('{"event": "summary"')]
    assert len(lines) == 1  # rank 0 alone prints and logs
    assert json.loads(lines[0])["steps"] == 2
    assert json.load(open(os.path.join(out, "args.json")))["world_size"] == 2
    assert os.path.exists(os.path.join(out, "backbone.pth"))


def _bad(method, tmp_path, *args, torchrun=0):
    p = run_script(f"{method}.py", *tiny(method, str(tmp_path / "bad")), *args, check=False, torchrun=torchrun)
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    return p, err


def _corrupt_folder(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            torchvision.transforms.functional.to_pil_image(torch.rand(3, 40, 40)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    return root


BAD_INPUTS = {
    "missing path": (lambda t: ["--data", str(t / "nope")], "data path not found"),
    "empty folder": (lambda t: (t / "empty" / "cls").mkdir(parents=True) or ["--data", str(t / "empty")], "no images found"),
    "corrupt image": (lambda t: ["--data", str(_corrupt_folder(t)), "--max-steps", "3"], "broken.png"),
    "unknown arch": (lambda t: ["--arch", "resnet9"], "unknown arch 'resnet9'"),
    "unknown preset": (lambda t: ["--preset", "huge"], "unknown preset 'huge'"),
    "bad flag value": (lambda t: ["--batch-size", "many"], "--batch-size"),
    "batch above dataset": (lambda t: ["--batch-size", "128"], "larger than the dataset"),
}


# shared plumbing is checked once on mocov3.py; data errors on every method (each has its own data path)
BAD_INPUT_CASES = [("mocov3", c) for c in BAD_INPUTS] + [
    (m, c) for m in METHODS if m != "mocov3" for c in ("missing path", "corrupt image")]


@pytest.mark.parametrize("method,case", BAD_INPUT_CASES)
def test_bad_input_one_line_exit_2(method, case, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    p, err = _bad(method, tmp_path, *make_args(tmp_path))
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err) == 1 and expected in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_corrupt_image_named_from_worker_process(tmp_path):
    p, err = _bad("mocov3", tmp_path, "--data", str(_corrupt_folder(tmp_path)), "--workers", "1", "--max-steps", "3")
    assert p.returncode == 2 and len(err) == 1 and "broken.png" in err[0], p.stderr


def test_batch_not_divisible_by_world(tmp_path):
    p, err = _bad("mocov3", tmp_path, "--batch-size", "7", torchrun=2)
    assert p.returncode != 0 and any("not divisible by the world size 2" in e for e in err), p.stderr


def test_resume_refuses_mismatch_and_keeps_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    run_script("mocov3.py", *tiny("mocov3", out, "--max-steps", "1"))
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    for flag, value in (("--arch", "resnet50"), ("--batch-size", "16")):
        p = run_script("mocov3.py", *tiny("mocov3", out, "--resume", "auto", flag, value), check=False)
        assert p.returncode == 2 and f"{flag[2:].replace('-', '_')}=" in p.stderr.strip(), p.stderr
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    p = run_script("mocov3.py", *tiny("mocov3", out, "--resume", str(tmp_path / "junk.pth")), check=False)
    assert p.returncode == 2 and "not a readable checkpoint" in p.stderr
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before


@pytest.mark.parametrize("script", [*METHODS, "eval_linear"])
def test_help_lists_every_field_with_its_doc_choices_and_presets(script, capsys):
    """Every field of the script's Args with its doc, the method's own flags before the plumbing, the choices
    of --arch/--stem/--precision/--preset, and what each preset sets (e.g. the cpu preset's image size)."""
    import importlib
    import common
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    norm = lambda t: " ".join(t.split()).replace("- ", "-")  # noqa: E731 -- undo argparse's line wrapping
    out = norm(capsys.readouterr().out)
    assert e.value.code == 0
    for name, doc in common.field_docs(mod.Args).items():
        assert f"--{name.replace('_', '-')}" in out and norm(" ".join(doc.split()[:6])) in out, name
    assert out.index("method hyperparameters") < out.index("data, run and plumbing")
    assert "{resnet18, resnet50, vit_small, vit_base}" in out and "{imagenet, small}" in out
    assert "{auto, fp32, bf16, fp16}" in out and "{auto, " + ", ".join(mod.PRESETS) + "}" in out
    for preset, values in mod.PRESETS.items():
        for key, value in values.items():
            assert f"{preset}: {value}" in out, (preset, key)


def test_two_process_step_equals_one_process_step(tmp_path):
    """Same global batch: 1 process vs 2 torchrun processes give the same loss and updated weights."""
    one = run_script("tests/dist_step.py", str(tmp_path / "one"))
    two = run_script("tests/dist_step.py", str(tmp_path / "two"), torchrun=2)
    a, b = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)
    assert a["weights_abs"] == pytest.approx(b["weights_abs"], rel=1e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "run")
    run_script("mocov3.py", *tiny("mocov3", out, "--max-steps", "2"))
    return out


@pytest.mark.parametrize("mode", ["knn", "linear", "finetune"])
@pytest.mark.parametrize("file", ["backbone.pth", "checkpoint.pth"])
def test_eval_linear_all_modes_from_either_file(pretrained, mode, file, tmp_path):
    p = run_script("eval_linear.py", "--pretrained", os.path.join(pretrained, file), "--mode", mode,
                   "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1", "--workers", "0",
                   "--knn-k", "10", "--output-dir", str(tmp_path / "ev"))
    rec = summary(p)
    assert 0 <= rec["top1"] <= rec["top5"] <= 100
    assert rec["protocol"].startswith({"knn": "weighted kNN", "linear": "linear probe", "finetune": "fine-tune"}[mode])


def test_eval_linear_reads_arch_from_file_and_refuses_conflicts(pretrained, tmp_path):
    p = run_script("eval_linear.py", "--pretrained", os.path.join(pretrained, "backbone.pth"), "--arch", "resnet50",
                   "--synthetic-size", "64", "--workers", "0", "--output-dir", str(tmp_path / "ev"), check=False)
    assert p.returncode == 2 and "conflicts with the pretrained file" in p.stderr
    (tmp_path / "junk.pth").write_bytes(b"junk")
    p = run_script("eval_linear.py", "--pretrained", str(tmp_path / "junk.pth"), check=False)
    assert p.returncode == 2 and "not a readable checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_real_images_from_an_imagefolder(imagenette, tmp_path):
    """A real ImageFolder with train/ and val/: JPEG decoding, labels and the kNN monitor on real data."""
    out = str(tmp_path / "real")
    p = run_script("mocov3.py", "--data", imagenette, "--arch", "resnet18", "--subset", "40", "--img-size", "32",
                   "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--knn-every", "0",
                   "--mlp-dim", "64", "--output-dir", out)
    rec = summary(p)
    assert rec["steps"] == 2 and rec["loss"] > 0
    assert json.load(open(os.path.join(out, "args.json")))["preset"] == "imagenet"


@pytest.mark.parametrize("method", METHODS)
def test_compile_keeps_one_graph_per_frame(method, tmp_path, monkeypatch):
    """--compile must not recompile as the schedules move (a Python-float EMA coefficient did, every step).
    Runs the real training loop in-process with the aot_eager backend (same graph capture, no codegen)."""
    import importlib
    import torch._dynamo.utils as dynamo_utils
    import common
    mod = importlib.import_module(method)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager"))
    graphs, log_step = [], common.Logger.log_step

    def counting(self, *args, **kwargs):
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
        return log_step(self, *args, **kwargs)

    monkeypatch.setattr(common.Logger, "log_step", counting)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    mod.main(tiny(method, str(tmp_path), "--compile", "--max-steps", "4"))
    assert len(graphs) == 4 and graphs[0] > 0, graphs
    assert graphs[-1] == graphs[0], f"graphs compiled after each step: {graphs} (recompiled after step 1)"
