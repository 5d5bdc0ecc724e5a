"""Upstream notices that say nothing actionable to a user of ov2_megatron's commands.

megatron-core warns once per process that Transformer Engine and Apex are absent (expected on
CPU), torch and megatron announce deprecations of their own internals, and so on. Every entry
point (training and the tools; at module level where spawned ranks import the tool) calls
`quiet_upstream_notices()` so that what remains on the console is ours and actionable.
"""

import warnings

_NOTICES = (
    ".*(Transformer Engine|Apex).*not installed.*",
    ".*full scope is deprecated.*",
    ".*is deprecated. Please use `torch.distributed.*",
    ".*reduce_scatter_tensor. is deprecated.*",
    ".*The .grad attribute of a Tensor that is not a leaf.*",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    ".*`load_state_dict` is deprecated.*",
    ".*Please use DTensor instead.*",
)


def quiet_upstream_notices() -> None:
    for pattern in _NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
