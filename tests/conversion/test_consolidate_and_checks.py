"""consolidate (distributed <-> one state dict), the checks every conversion makes on its
input, and the real command lines with --help. No third-party packages needed."""

import json
import os
import shutil
import subprocess
import sys

import torch

from tests.conversion.conftest import ROOT, run_tools

SUBCOMMANDS = ("export-timm", "export-hf", "import-openclip", "consolidate")


def test_consolidate_round_trip_to_pp2_is_bitwise(tp2_run, tmp_path):
    first, back = str(tmp_path / "model.pt"), str(tmp_path / "pp2_run")
    second = str(tmp_path / "again.pt")
    run_tools(("convert_checkpoint", ["consolidate", "--checkpoint", tp2_run, "--output", first]),
              ("convert_checkpoint", ["consolidate", "--input", first, "--output", back,
                                      "--tp", "1", "--pp", "2"]),
              ("convert_checkpoint", ["consolidate", "--checkpoint", back, "--output", second]))
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    assert os.path.isfile(str(tmp_path / "model.config.json"))
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["parallel"]["pipeline"] == 2
    assert "vision.blocks.3.attn.qkv.weight" in a and "decoder.head.weight" in a
    assert a["vision.blocks.3.attn.qkv.weight"].shape == (384, 128)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def _broken_copies(tp2_run, tmp_path) -> dict[str, str]:
    """A truncated data file, a config.json whose MLP width disagrees, a missing .metadata."""
    copies = {}
    for case in ("truncated", "mismatched", "no_metadata"):
        copies[case] = str(tmp_path / case)
        shutil.copytree(tp2_run, copies[case])
    step = os.path.join(copies["truncated"], "checkpoints", "step_00000003")
    victim = os.path.join(step, "__1_0.distcp")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    config = os.path.join(copies["mismatched"], "config.json")
    with open(config) as f:
        data = json.load(f)
    data["model"]["vision"]["mlp_dim"] = 256
    with open(config, "w") as f:
        json.dump(data, f)
    os.remove(os.path.join(copies["no_metadata"], "checkpoints", "step_00000003", ".metadata"))
    return copies


def test_bad_checkpoints_fail_naming_the_file_or_tensor_and_write_nothing(tp2_run, tmp_path):
    copies = _broken_copies(tp2_run, tmp_path)
    outputs = {case: str(tmp_path / f"out_{case}") for case in copies}
    results = run_tools(*[("convert_checkpoint", ["export-timm", "--checkpoint", path,
                                                  "--output", outputs[case]])
                          for case, path in copies.items()], check=False)
    errors = {case: err for case, (code, _, err) in zip(copies, results) if code == 2}
    assert errors.keys() == copies.keys(), results
    # The manifest (written last at save) names damaged and missing files before any read.
    assert "__1_0.distcp has " in errors["truncated"]
    assert "the manifest says" in errors["truncated"] and "truncated" in errors["truncated"]
    assert "vision_layers.layers.mlp.linear_fc1.weight has shape (4, 512, 128), config.json's " \
           "model needs (4, 256, 128)" in errors["mismatched"]
    assert "step_00000003/.metadata is missing" in errors["no_metadata"]
    for case, output in outputs.items():
        assert not os.path.exists(output), case
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_command_lines_have_help_and_refuse_an_existing_output(tp2_run, tmp_path):
    for argv in [[sub, "--help"] for sub in SUBCOMMANDS]:
        done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage: convert_checkpoint.py" in done.stdout, argv
    done = subprocess.run([sys.executable, "tools/extract_features.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--pixels" in done.stdout
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "export-hf",
                           "--checkpoint", tp2_run, "--output", str(existing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "already exists" in done.stderr, done.stderr[-2000:]
    assert os.listdir(existing) == ["keep.txt"]
