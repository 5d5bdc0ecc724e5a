"""Makes megatron-core unimportable in a process whose environment sets OV2_BLOCK_MEGATRON=1.

tests/conftest.py runs the tests it lists as megatron-free first, with this blocker in the
pytest process and (through PYTHONPATH and this file) in every Python subprocess they start:
a megatron import there fails the test, which proves the list right. Only such proven tests
are left out of the second megatron-core line of `make test` (`pytest --megatron-line`).
"""

import os
import sys


class MegatronBlocked(ImportError):
    pass


class BlockMegatron:
    """A meta-path finder that refuses `megatron` and its submodules."""

    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise MegatronBlocked(
                f"import of {name!r} in a test listed as megatron-free (tests/conftest.py "
                "MEGATRON_FREE): it touches megatron-core, so take it off that list")
        return None


def install() -> BlockMegatron:
    blocker = BlockMegatron()
    sys.meta_path.insert(0, blocker)
    return blocker


if os.environ.get("OV2_BLOCK_MEGATRON") == "1":
    install()
