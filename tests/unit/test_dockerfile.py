"""The image holds what runs in it: the packages setup.py installs (ov2_megatron, kernels),
the tools, the launchers and the tests that tools/gpu_check.sh runs (issue #12: the image once
lacked kernels/, so `pip install -e .` gave a package whose Triton kernels did not import)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def copied_paths() -> set[str]:
    paths = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"^COPY\s+(.+)\s+\S+$", line.strip())
        if match:
            paths.update(match.group(1).split())
    return paths


def test_dockerfile_copies_every_directory_the_image_runs():
    paths = copied_paths()
    needed = {"setup.py", "ov2_megatron", "kernels", "tools", "launch", "tests", "pytest.ini"}
    assert needed <= paths, f"Dockerfile does not COPY {sorted(needed - paths)}"
    setup = (ROOT / "setup.py").read_text()
    for package in re.findall(r'"(\w+)", "\1\.\*"', setup):  # find_packages(include=[...])
        assert package in paths, package
