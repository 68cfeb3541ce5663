"""Every training script as a user runs it (in-process main(argv) unless the process itself matters):
outputs contract under --compile, export, bad input, --help, eval_linear on either file, real images. Resume,
preemption and the finished-run guard: test_reliability.py; torchrun: test_distributed.py."""
import importlib
import json
import os
import shutil

import pytest
import torch
import torchvision

from conftest import ROOT, read_log, run_script, tiny

METHODS = [m for m in ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")
           if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
def run_main(method, argv, capsys):
    """main(argv) in-process; its JSON summary (the last line it printed)."""
    importlib.import_module(method).main(argv)
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["event"] == "summary"
    return rec


@pytest.mark.parametrize("method", METHODS)
def test_outputs_contract_with_compile_and_one_graph(method, tmp_path, capsys, monkeypatch):
    """A --compile run's outputs: summary, args.json, log.jsonl, checkpoint.pth, backbone.pth, curves.png.
    --compile must not recompile as the schedules move (a Python-float EMA coefficient did, every step):
    dynamo's eager backend keeps the same graph capture and guards that decide a recompile, without AOT
    tracing or codegen."""
    import torch._dynamo.utils as dynamo_utils
    import common
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    graphs, log_step = [], common.Logger.log_step

    def counting(self, *args, **kwargs):
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
        return log_step(self, *args, **kwargs)

    monkeypatch.setattr(common.Logger, "log_step", counting)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    out = str(tmp_path / "run")
    # 3 steps: the speed figures count the steps after the 2 warm-up steps
    rec = run_main(method, tiny(method, out, "--compile", "--max-steps", "3", "--knn-every", "1",
                                "--knn-k", "20"), capsys)
    assert len(graphs) == 3 and graphs[0] > 0, graphs
    assert graphs[2] == graphs[0], f"graphs compiled after each step: {graphs} (recompiled after step 1)"
    assert rec["method"] == method and rec["steps"] == 3
    for key in ("img_per_s", "step_ms", "peak_mem_mb", "loss", "knn_top1"):
        assert isinstance(rec[key], float) and rec[key] == rec[key], key  # present and not NaN
    assert 0 <= rec["knn_top1"] <= 100
    args = json.load(open(os.path.join(out, "args.json")))
    img_size = 16 if method in ("densecl", "detcon") else 32  # the last --img-size of tiny(method)
    assert args["method"] == method and args["world_size"] == 1 and args["img_size"] == img_size
    assert "torch" in args
    log = read_log(out)
    steps = [r for r in log if "img_per_s" in r and r.get("event") != "summary"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"step", "epoch", "loss", "lr", "img_per_s", "data_time_frac", "peak_mem_mb"} <= set(r)
    assert any("knn_top1" in r for r in log)
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ck["method"] == method and ck["step"] == 3 and {"model", "optimizer", "rng"} <= set(ck)
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


def _bad(method, tmp_path, capsys, *args):
    """Run main() in-process as the command line would; (exit code, stderr lines)."""
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        mod.main(tiny(method, str(tmp_path / "bad"), *args))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


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
    "empty folder": (lambda t: (t / "empty" / "cls").mkdir(parents=True) or ["--data", str(t / "empty")],
                     "no images found"),
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
def test_bad_input_one_line_exit_2(method, case, tmp_path, capsys):
    make_args, expected = BAD_INPUTS[case]
    code, err = _bad(method, tmp_path, capsys, *make_args(tmp_path))
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    """The same as a user sees it: a subprocess, one stderr line, exit code 2."""
    p = run_script("mocov3.py", *tiny("mocov3", str(tmp_path / "bad")), "--data", str(tmp_path / "nope"),
                   check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: --data: data path not found: {tmp_path / 'nope'} (use synthetic, cifar10, cifar100, "
        "stl10 or an image folder)"], p.stderr


def test_corrupt_image_named_from_worker_process(tmp_path, capsys):
    code, err = _bad("mocov3", tmp_path, capsys, "--data", str(_corrupt_folder(tmp_path)), "--workers", "1",
                     "--max-steps", "3")
    assert code == 2 and len(err) == 1 and "broken.png" in err[0], err


def test_resume_refuses_mismatch_and_keeps_checkpoint(pretrained, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(pretrained, out)  # a finished 2-step run
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    record = open(os.path.join(out, "args.json")).read()
    for flag, value in (("--arch", "resnet50"), ("--batch-size", "16")):
        code, err = _bad("mocov3", tmp_path, capsys, "--output-dir", out, "--resume", "auto", flag, value)
        assert code == 2 and len(err) == 1 and f"{flag[2:].replace('-', '_')}=" in err[0], err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    code, err = _bad("mocov3", tmp_path, capsys, "--output-dir", out, "--resume", str(tmp_path / "junk.pth"))
    assert code == 2 and "is not a checkpoint written by these scripts" in err[0]
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before
    assert open(os.path.join(out, "args.json")).read() == record  # refused before setup writes anything


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
        if name in getattr(mod.Args, "not_flags", ()):  # shared fields that are not this script's flags
            assert f"--{name.replace('_', '-')} " not in out, name
            continue
        assert f"--{name.replace('_', '-')}" in out and norm(" ".join(doc.split()[:6])) in out, name
    assert out.index("method hyperparameters") < out.index("data, run and plumbing")
    assert "{resnet18, resnet50, vit_small, vit_base}" in out and "{imagenet, small}" in out
    assert "{auto, fp32, bf16, fp16}" in out and "{auto, " + ", ".join(mod.PRESETS) + "}" in out
    for preset, values in mod.PRESETS.items():
        for key, value in values.items():
            assert f"{preset}: {value}" in out, (preset, key)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "run")
    importlib.import_module("mocov3").main(tiny("mocov3", out, "--max-steps", "2"))
    yield out
    shutil.rmtree(out)


@pytest.mark.parametrize("mode", ["knn", "linear", "finetune"])
@pytest.mark.parametrize("file", ["backbone.pth", "checkpoint.pth"])
def test_eval_linear_all_modes_from_either_file(pretrained, mode, file, tmp_path, capsys):
    per_mode = ["--knn-k", "10"] if mode == "knn" else ["--epochs", "1"]
    rec = run_main("eval_linear", ["--pretrained", os.path.join(pretrained, file), "--mode", mode,
                                   "--synthetic-size", "64", "--batch-size", "16", *per_mode,
                                   "--workers", "0", "--output-dir", str(tmp_path / "ev")], capsys)
    assert 0 <= rec["top1"] <= rec["top5"] <= 100
    assert rec["protocol"].startswith(
        {"knn": "weighted kNN", "linear": "linear probe", "finetune": "fine-tune"}[mode])


def test_eval_linear_reads_arch_from_file_and_refuses_conflicts(pretrained, tmp_path, capsys):
    import eval_linear
    (tmp_path / "junk.pth").write_bytes(b"junk")
    for argv, expected in [
        (["--pretrained", os.path.join(pretrained, "backbone.pth"), "--arch", "resnet50", "--synthetic-size",
          "64", "--workers", "0", "--output-dir", str(tmp_path / "ev")],
         "conflicts with the pretrained file"),
        (["--pretrained", str(tmp_path / "junk.pth")], "is not a checkpoint written by these scripts"),
    ]:
        with pytest.raises(SystemExit) as e:
            eval_linear.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("content", ["text", "pickled module"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(content, tmp_path, capsys):
    """--pretrained and --resume of a text file, or of a pickled module (code: weights_only refuses it): one
    line saying what the file is not, never a fragment of the unpickler's text nor advice to load code."""
    path = tmp_path / "x.pth"
    if content == "text":
        path.write_text("174812789 is a number, then text\n")
        why = "it is not a zip archive / pickle"
    else:
        torch.save(torch.nn.Linear(2, 2), path)
        why = "it is a zip archive / pickle, but damaged or holding more than tensors and plain data"
    want = [f"error: {path} is not a checkpoint written by these scripts ({why})"]
    for script, argv in (("eval_linear", ["--pretrained", str(path), "--output-dir", str(tmp_path / "ev")]),
                         ("mocov3", tiny("mocov3", tmp_path / "run", "--resume", str(path)))):
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script).main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == want, script
    assert sorted(os.listdir(tmp_path)) == ["x.pth"]  # refused before anything was written


def test_real_images_from_an_imagefolder(imagenette, tmp_path, capsys):
    """A real ImageFolder with train/ and val/: JPEG decoding, labels and the kNN monitor on real data."""
    out = str(tmp_path / "real")
    rec = run_main("mocov3", ["--data", imagenette, "--arch", "resnet18", "--subset", "40",
                              "--img-size", "32", "--batch-size", "8", "--max-steps", "2", "--workers", "0",
                              "--knn-every", "0", "--mlp-dim", "64", "--output-dir", out], capsys)
    assert rec["steps"] == 2 and rec["loss"] > 0
    preset = "imagenet" if torch.cuda.is_available() else "cpu"  # --preset auto without a GPU: cpu
    assert json.load(open(os.path.join(out, "args.json")))["preset"] == preset
