"""ReplicaStream: the data split of a run's first start kept across data-parallel sizes.
The reference is the stream that never changed layout: a resume at another DP size must put
the very same sample (pixels and tokens) at every global-batch position. Real DALI on CPU."""

import pytest

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (absent on the GPU box)")

from ov2_megatron.data.replica_stream import ReplicaStream, _pieces, stream_states
from tests.data.test_dali_pipeline import make_config, numbered_shards, tokenizer_model  # noqa: F401

GLOBAL = 24


@pytest.mark.parametrize("streams", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 6, 8])
def test_every_row_of_a_step_is_read_by_exactly_one_replica(streams, replicas):
    rows = GLOBAL // streams
    read = [(s, row) for r in range(replicas) for s, first, end in
            _pieces(r, replicas, streams, GLOBAL) for row in range(first, end)]
    assert read == [(s, row) for s in range(streams) for row in range(rows)]


def _steps(config, replicas, micro_batch, steps, saved=None, first_step=0):
    """{global position: (image bytes, tokens)} over `steps` steps, and every replica's state."""
    loaders = [ReplicaStream(config, replica=r, replicas=replicas, micro_batch=micro_batch,
                             global_batch=GLOBAL, saved=saved, device="cpu")
               for r in range(replicas)]
    rows, share = {}, GLOBAL // replicas
    for step in range(first_step, first_step + steps):
        for r, loader in enumerate(loaders):
            for i in range(share // micro_batch):
                batch = next(iter(loader))
                for j in range(micro_batch):
                    position = step * GLOBAL + r * share + i * micro_batch + j
                    rows[position] = (batch["images"][j].numpy().tobytes(),
                                      tuple(batch["tokens"][j].tolist()))
    return rows, [stream for loader in loaders for stream in stream_states(loader.state())]


@pytest.mark.parametrize("before,after,micro_after", [(4, 3, 2), (2, 4, 3), (3, 1, 4)])
def test_resume_on_another_size_reads_on_where_the_split_stopped(
        numbered_shards, tokenizer_model, before, after, micro_after):  # noqa: F811
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    straight, _ = _steps(config, before, 2, 3)
    _, saved = _steps(config, before, 2, 1)
    resumed, _ = _steps(config, after, micro_after, 2, saved=saved, first_step=1)
    assert sorted(resumed) == list(range(GLOBAL, 3 * GLOBAL))
    assert all(resumed[p] == straight[p] for p in resumed)
    tokens = [straight[p][1] for p in range(GLOBAL, 2 * GLOBAL)]
    assert len(set(tokens)) == GLOBAL  # 24 different samples per step: a real comparison


def test_a_changed_global_batch_is_refused_naming_the_way_out(numbered_shards,
                                                            tokenizer_model):  # noqa: F811
    config = make_config(numbered_shards, tokenizer_model, resolution=16)
    _, saved = _steps(config, 2, 4, 1)
    with pytest.raises(ValueError, match="global_batch 12 does not split .* "
                                         "train.resume_data_stream=false"):
        ReplicaStream(config, replica=0, replicas=1, micro_batch=2, global_batch=12,
                      saved=saved, device="cpu")
