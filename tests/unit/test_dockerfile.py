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


def pinned(path: str, package: str = "megatron-core") -> set[str]:
    text = (ROOT / path).read_text()
    return set(re.findall(rf'{package}==([0-9][0-9.]*)', text))


def test_megatron_core_is_pinned_to_the_release_each_line_tests():
    """The image installs the release the Python 3.12 line of `make test` proves, and setup.py
    pins the same release per Python version (issue #12: `>=0.16.1,<0.20` resolved to an
    untested 0.19.x in the container)."""
    main_line, py312_line = pinned("requirements-cpu.txt"), pinned("requirements-py312.txt")
    assert len(main_line) == 1 and len(py312_line) == 1 and main_line != py312_line
    assert pinned("Dockerfile") == py312_line
    setup = (ROOT / "setup.py").read_text()
    markers = dict(re.findall(r'"megatron-core==([0-9.]+); (python_version [<>=]+ \'3\.12\')"', setup))
    assert markers == {next(iter(main_line)): "python_version < '3.12'",
                       next(iter(py312_line)): "python_version >= '3.12'"}, markers
    assert "FROM nvcr.io/nvidia/pytorch:" in (ROOT / "Dockerfile").read_text()
    assert "python" in (ROOT / "Makefile").read_text() and "requirements-py312.txt" in (
        ROOT / "Makefile").read_text(), "make test must build the Python 3.12 line"
