"""Exports honour the umask: the staged directory and file (mkdtemp / mkstemp, 0700 / 0600)
end up 0777 / 0666 masked by the umask, as a plain mkdir / open would make them."""

import os
import stat

import pytest

from ov2_megatron.conversion.atomic_output import current_umask, staged_directory, staged_file


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        with staged_directory(str(tmp_path / "export")) as staging:
            with open(os.path.join(staging, "config.json"), "w") as f:
                f.write("{}")
        with staged_file(str(tmp_path / "model.pt")) as staging:
            with open(staging, "w") as f:
                f.write("weights")
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(tmp_path / "export") == 0o777 & ~umask
    assert mode(tmp_path / "export" / "config.json") == 0o666 & ~umask
    assert mode(tmp_path / "model.pt") == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["export", "model.pt"]  # nothing staged is left
