"""How the method files read: the loss and the model before the machinery, Kept/Changed as bullet lists, every
pointer to a README or RESULTS.md section names one that exists, DenseCL's encoder outputs by name."""
import ast
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import densecl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["mocov3.py", "fast_moco.py", "densecl.py", "detcon.py", "rotation_aux.py"]


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def sections(md):
    """{heading text: body} of the '## ' sections of a markdown file (code blocks skipped)."""
    out, name, in_code = {}, None, False
    for line in read(md).splitlines():
        in_code ^= line.startswith("```")
        if line.startswith("## ") and not in_code:
            name = line[3:].strip()
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def norm(text):
    return re.sub(r"[\s-]+", " ", text.strip().lower())


def find_section(md, name):
    """The body of the section of `md` whose heading starts with `name` (case, spaces and hyphens ignored)."""
    hits = [body for head, body in sections(md).items() if norm(head).startswith(norm(name))]
    assert hits, f"{md} has no section {name!r}; its sections: {list(sections(md))}"
    return hits[0]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def pointers(text):
    """Every pointer to a README / RESULTS.md section in a file's text, lines joined (a pointer may wrap)."""
    flat = re.sub(r"\s*\n\s*(#\s*)?", " ", text)
    found = [("README", m.group(1), None, None) for m in re.finditer(r"README: \"?([\w .-]+?)\"?[),;]", flat)]
    found += [("README", m.group(1), m.group(2), m.group(3))
              for m in re.finditer(r"README's ([\w -]+?) (section|table)(?:, \"([\w .-]+)\")?", flat)]
    found += [("RESULTS.md", m.group(1), None, None)
              for m in re.finditer(r"RESULTS\.md: ([\w ]+?)[),.;]", flat)]
    found += [("RESULTS.md#", m.group(1), None, None) for m in re.finditer(r"RESULTS\.md#([\w-]+)", flat)]
    return found


@pytest.mark.parametrize("name", METHODS)
def test_pointers_to_readme_and_results_name_sections_that_exist(name):
    found = pointers(read(name))
    assert found, f"{name}: no README pointer found (the patterns above no longer match how files point)"
    for doc, target, kind, paragraph in found:
        if doc == "RESULTS.md#":
            assert target in {slug(h) for h in sections("RESULTS.md")}, f"{name}: RESULTS.md#{target}"
            continue
        body = find_section("README.md" if doc == "README" else doc, target)
        if kind == "table":
            assert re.search(r"^\|.*\|$", body, re.M), f"{name}: README's {target} section has no table"
        if paragraph:  # a paragraph of the section, as README starts them: **Healthy loss.**
            assert f"**{paragraph}.**" in body, f"{name}: README's {target} section has no {paragraph!r}"


def docstring_list(doc, label):
    """The lines of the docstring's block that starts with `label` (up to the next blank line)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("label", ["Kept", "Changed"])
def test_kept_and_changed_are_bullet_lists(name, label):
    block = docstring_list(ast.get_docstring(ast.parse(read(name)), clean=False), label)
    assert block[0].endswith(":"), f"{name}: {label!r} runs on after its heading: {block[0]!r}"
    items = block[1:]
    assert len([line for line in items if line.startswith("- ")]) >= 2, f"{name}: {label} has no bullets"
    # every line is a bullet or the indented continuation of one (sub-bullets included)
    assert items[0].startswith("- ") and all(line.startswith(("- ", "  ")) for line in items), \
        f"{name}: {label} is not a bullet list: {items}"


def first_lines(name):
    """{top-level name: its first line (decorators included)} of a file."""
    out = {}
    for node in ast.parse(read(name)).body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for t in getattr(node, "targets", []):
            out[getattr(t, "id", None)] = start
        if hasattr(node, "name"):
            out[node.name] = start
    return out


@pytest.mark.parametrize("name, loss, model, machinery", [
    ("mocov3.py", ["contrastive_loss"], ["build_mlp", "MoCoV3"], ["check_args", "main"]),
    ("densecl.py", ["infonce_rows", "global_loss", "match_locations", "dense_loss"],
     ["global_head", "dense_head", "Encoded", "DenseCL"],
     ["enqueue", "shuffle_bn", "LSE_CHUNK", "RowLogSumExp", "draw_matches", "main"]),
    ("detcon.py", ["detcon_loss", "_one_direction", "row_weights"],
     ["mlp", "sample_ids", "mask_pool", "DetCon"],
     ["fh_segments", "MaskedImages", "reduce_mask", "crop_box", "JointViews", "show_masks", "main"]),
])
def test_the_loss_and_the_model_come_before_the_machinery(name, loss, model, machinery):
    at = first_lines(name)

    def above(names, line):
        return [f for f in names if at[f] < line]  # those of `names` defined above `line`

    assert not above(loss, at["PRESETS"]), f"{name}: the loss above Args and PRESETS"
    assert not above(model, max(at[f] for f in loss)), f"{name}: the model above the loss"
    assert not above(machinery, max(at[f] for f in model)), f"{name}: machinery above the model"


def test_densecl_encoder_outputs_have_names_and_shapes():
    torch.manual_seed(0)
    args = densecl.Args(arch="resnet18", stem="small", img_size=32, mlp_dim=32, proj_dim=16, queue_size=16)
    model, x = densecl.DenseCL(args), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = densecl.Encoded(*model.encode(x))
        model.momentum_dense_head = None  # as --dense-weight 0 builds it: no dense branch
        plain = densecl.Encoded(*model.encode(x, momentum=True))
    assert out.global_out.shape == (2, 16) and out.dense_out.shape == (2, 16, 16)  # [n, D], [n, D, S^2]
    assert out.fmap.shape == (2, 512, 4, 4)  # [n, C, S, S]: what match_locations takes
    assert plain.global_out.shape == (2, 16) and plain.dense_out is None and plain.fmap is None


def test_common_reads_in_the_order_a_method_uses_it_and_its_reader_part_is_short():
    """SPEC: common.py in the order a method file uses it, the part a method reader needs <= ~700 lines: the
    '=====' sections, without the '--------' details that follow each of them."""
    lines = read("common.py").splitlines()
    heads = [line.split(" ", 2)[2] for line in lines if line.startswith("# ====")]
    assert heads == ["errors & args", "run setup", "data", "augmentations", "backbones",
                     "optimizer & schedules", "checkpoint, resume & export", "kNN monitor", "logging"]
    reader, inside = 0, False  # from the first section on (the module docstring and imports come before)
    for line in lines:
        if line.startswith("# ====") or line.startswith("# --------"):
            inside = line.startswith("# ====")
        reader += inside
    assert reader <= 700, reader
    assert not re.search(r"^# #####", read("common.py"), re.M)  # no banner
