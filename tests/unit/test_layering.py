"""The library does not depend on the test tree (#15, item 6): no module of ov2_megatron or
kernels imports `tests`, read from the source (an import inside a function counts too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_never_imports_the_test_tree():
    files = sorted((ROOT / "ov2_megatron").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) > 50
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f)
                                                   if m == "tests" or m.startswith("tests."))
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}
    assert "tests.reference.openvision2_reference" in _imported_modules(
        ROOT / "tools" / "vs_reference.py")  # the check sees function-level imports
