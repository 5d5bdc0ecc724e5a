"""A megatron TransformerBlock holding layers [start, stop) of a longer stack.

Pipeline placement is decided by pipeline_split.py, not by megatron's uniform split, so each
stage builds its layers as a self-contained block. Its sharded state dict still places every
layer at its global index in one stacked tensor per parameter, so checkpoints do not depend
on the TP/PP layout that wrote them.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.utils import sharded_state_dict_default


class StageBlock(TransformerBlock):
    def __init__(self, config: TransformerConfig, spec: ModuleSpec, layers: tuple[int, int],
                 total_layers: int, final_norm: bool):
        # pre_process=True: the block always takes hidden_states from our forward (megatron's
        # set_input_tensor path is handled by the stage model).
        super().__init__(config, spec, post_layer_norm=final_norm, pre_process=True,
                         post_process=final_norm)
        self.global_start, self.total_layers = layers[0], total_layers
        assert len(self.layers) == layers[1] - layers[0], (len(self.layers), layers)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        assert not sharded_offsets, "StageBlock is not nested in a sharded parent"
        state = {}
        for local, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local}."
            global_index = self.global_start + local
            # One [total_layers, ...] tensor per parameter; this layer is row global_index.
            layer_state = layer.sharded_state_dict(
                local_prefix, [(0, global_index, self.total_layers)], metadata)
            replace_prefix_for_sharding(layer_state, local_prefix, f"{prefix}layers.")
            state.update(layer_state)
        for name, module in self.named_children():
            if module is not self.layers:
                state.update(sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        return state
