"""`make demo`: the embedded default, end to end on CPU, with what exists so far.

Today it brings up megatron-core on the CPU backend (process groups, RNG tracker), builds a
two-layer megatron TransformerBlock and runs one forward+backward, printing the numbers. The
OpenVision 2 model, data pipeline and training loop replace this as their issues land; until
then the demo says plainly what it does not do yet.
"""

from __future__ import annotations

import time


def main() -> None:
    import megatron.core
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from ov2_megatron import cpu_backend
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, shutdown

    start = time.perf_counter()
    initialize(ParallelLayout(), seed=0)
    print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}, CPU backend: {cpu_backend.is_enabled()}")
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               use_cpu_initialization=True)
    block = TransformerBlock(config, get_gpt_layer_local_spec())
    x = torch.randn(16, 2, 64, requires_grad=True)  # [s, b, h]
    out = block(x, attention_mask=None)
    out.square().mean().backward()
    grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in block.parameters()))
    print(f"megatron TransformerBlock forward+backward on CPU: output {tuple(out.shape)}, "
          f"grad norm {grad_norm.item():.4f}, {time.perf_counter() - start:.1f} s")
    print("Not yet here: the OpenVision 2 model (issue 3), data (issue 4), training (issue 5).")
    shutdown()


if __name__ == "__main__":
    main()
