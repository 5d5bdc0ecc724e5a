"""What each parameter is to the official recipe: whether weight decay applies, and how the
official OpenVision 2 code initialises it. Keyed by standard name (models/state_dict_adapter.py),
which maps one to one onto the official flax names (conversion/official_format.py).

Weight decay (`decays`): the official optimizer decays every `.../kernel`, i.e. every Dense
and Conv weight (patch embedding, attention and MLP projections, image projection, head),
and nothing else: not biases, norms, the CLS token, nor the caption token embedding
(`txt_decoder/Embed_0/embedding`), whose rare pieces' rows decay would drive to zero.

Initialisation (`official_init`), read in UCSC-VLAA/OpenVision @6c24e45 and checked against
the fixture's params0.npz (tests/model/test_initialisation.py):
- ViT (`models/vit.py`): patch embedding kaiming-uniform (std sqrt(2 / fan_in)); CLS
  N(0, 1e-6); q/k/v, out and fc1 N(0, 0.02); fc2 truncated normal with std
  sqrt(0.3072 / width) (fan-out variance scaling, "timm trunc"), cut at 2 of its own stds.
- Caption decoder (`models/text_decoder_v2.py` with `text_transformer.Encoder1DBlock`): q/k/v
  N(0, d^-1/2); out-proj and fc2 N(0, d^-1/2 (2 x 12)^-1/2), where 12 is the block's
  default `depth`, which the decoder never passes (so it holds at every real depth); fc1
  N(0, (2d)^-1/2); token embedding N(0, 0.02); image projection N(0, w_vit^-1/2); head
  N(0, d^-1/2).
- Biases zero, LayerNorm scales one. Parameters the official model lacks (registers, learned
  position tables) get N(0, 0.02), the official ViT's learned position init.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_KERNEL = re.compile(r"\.(patch_embed|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|img_proj|head)"
                     r"\.weight$")
_BLOCK = re.compile(r"^(vision|decoder)\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                    r"\.weight$")
# text_transformer.Encoder1DBlock's default depth: its out-proj and fc2 std divides by
# sqrt(2 x 12) whatever the decoder's depth.
_OFFICIAL_BLOCK_DEPTH = 12
# flax's truncated variance scaling: truncated_normal(-2, 2) x std / 0.8796, the constant that
# makes the cut distribution's std the asked-for one.
_TRUNCATED_STD_OF_UNIT = 0.87962566103423978


def decays(name: str) -> bool:
    """Whether the official recipe applies weight decay to the parameter `name`."""
    return bool(_KERNEL.search(name))


@dataclass(frozen=True)
class Init:
    """One initialiser: 'zeros', 'ones', 'normal' (N(0, std)), 'truncated_normal' (std of the
    uncut normal std / 0.8796, cut at +-2 of it: the cut distribution's std is `std`) or
    'uniform' (U(-bound, bound) with bound = sqrt(3) std)."""

    kind: str
    std: float = 0.0

    @property
    def bound(self) -> float | None:
        """The largest |value| it can draw, where there is one."""
        if self.kind == "uniform":
            return math.sqrt(3.0) * self.std
        if self.kind == "truncated_normal":
            return 2.0 * self.std / _TRUNCATED_STD_OF_UNIT
        return None


def constant_init(name: str) -> Init | None:
    """Biases zero and LayerNorm scales one, in either scheme (model.init); None otherwise."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return Init("zeros")
    if leaf == "weight" and (".ln" in name or ".norm." in name):
        return Init("ones")
    return None


def official_init(name: str, shape: tuple[int, ...], vit_width: int,
                  decoder_width: int) -> Init:
    """How the official code initialises the parameter `name` (a standard name, full `shape`
    in the standard layout) of a model with these tower widths."""
    constant = constant_init(name)
    if constant:
        return constant
    block = _BLOCK.match(name)
    if block:
        return _block_init(*block.groups(), vit_width, decoder_width)
    if name == "vision.patch_embed.weight":  # [w, c, p, p]: flax kaiming_uniform
        return Init("uniform", math.sqrt(2.0 / math.prod(shape[1:])))
    fixed = {
        "vision.cls_token": Init("normal", 1e-6),
        "decoder.tok_embed.weight": Init("normal", 0.02),
        "decoder.img_proj.weight": Init("normal", vit_width ** -0.5),
        "decoder.head.weight": Init("normal", decoder_width ** -0.5),
    }
    return fixed.get(name, Init("normal", 0.02))


def _block_init(tower: str, part: str, vit_width: int, decoder_width: int) -> Init:
    if tower == "vision":
        if part == "mlp.fc2":
            return Init("truncated_normal", math.sqrt(0.3072 / vit_width))
        return Init("normal", 0.02)
    d = decoder_width
    return {
        "attn.qkv": Init("normal", d ** -0.5),
        "attn.proj": Init("normal", d ** -0.5 * (2 * _OFFICIAL_BLOCK_DEPTH) ** -0.5),
        "mlp.fc1": Init("normal", (2 * d) ** -0.5),
        "mlp.fc2": Init("normal", d ** -0.5 * (2 * _OFFICIAL_BLOCK_DEPTH) ** -0.5),
    }[part]


def mask_summary(names) -> tuple[list[str], list[str]]:
    """(decayed, undecayed) standard names with block indices written `*`, in order: the
    mask as --dry-run lists it."""
    decayed: dict[str, None] = {}
    undecayed: dict[str, None] = {}
    for name in names:
        pattern = re.sub(r"\.blocks\.\d+\.", ".blocks.*.", name)
        (decayed if decays(name) else undecayed)[pattern] = None
    return list(decayed), list(undecayed)
