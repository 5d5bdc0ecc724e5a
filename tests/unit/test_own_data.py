"""Own data means own data: given data.train_shards, no synthetic set, validation on the
user's shards (named in the log), no synthetic-label probe, a vocabulary that follows the
tokenizer, and a validation set too small for the data-parallel size refused at start-up."""

import os

import pytest

from ov2_megatron.recipes import get_recipe
from ov2_megatron.training import data_sources, evaluate
from ov2_megatron.training.run_config import apply_overrides
from tests.data.shard_factory import jpeg_bytes, synthetic_dataset, write_raw_shard


@pytest.fixture(scope="module")
def shards():
    """4 training shards, 2 validation shards and a 128-piece tokenizer (tests/data)."""
    return synthetic_dataset()


def own(shards, *extra, recipe="tiny_cpu"):
    return apply_overrides(get_recipe(recipe), [
        f"data.train_shards={shards.train_dir}", f"data.tokenizer_model={shards.tokenizer_model}",
        *extra])


def test_own_shards_switch_the_synthetic_set_and_its_probe_off(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("OV2_CACHE", str(tmp_path))
    run = own(shards, f"data.val_shards={shards.val_dir}")
    notes = data_sources.choose_sources(run)
    notes += data_sources.check_data(run, dp_size=1)
    assert run.synthetic == {} and run.train.linear_probe is False
    assert "the synthetic set is not built" in notes[0]
    assert f"validation: data.val_shards {shards.val_dir}" in notes
    assert any(n.startswith("linear probe: off") for n in notes)
    assert os.listdir(tmp_path) == []  # nothing built in the synthetic cache


def test_without_val_shards_the_last_training_shard_is_held_out_and_said(shards):
    run = own(shards)
    notes = data_sources.choose_sources(run)
    train = sorted(os.path.join(shards.train_dir, n) for n in os.listdir(shards.train_dir)
                   if n.endswith(".tar"))
    assert run.data.val_shards == train[-1]
    assert run.data.train_shards.split(",") == train[:-1]
    assert f"validation: held out the last training shard {train[-1]} (1 of 4" in notes[1]
    assert data_sources.choose_sources(run)[1] == f"validation: data.val_shards {train[-1]}"


def test_a_single_training_shard_means_no_validation_said_aloud(shards):
    first = sorted(n for n in os.listdir(shards.train_dir) if n.endswith(".tar"))[0]
    run = apply_overrides(get_recipe("tiny_cpu"), [
        f"data.train_shards={os.path.join(shards.train_dir, first)}"])
    notes = data_sources.choose_sources(run)
    assert run.data.val_shards == "" and notes[1].startswith("validation: none")
    assert evaluate.validation(run, None, None, None, step=0) == {}  # skipped, not crashed


def test_the_synthetic_set_stays_the_default_and_can_be_switched_off():
    run = get_recipe("tiny_cpu")
    assert data_sources.choose_sources(run)[0].startswith("data: the synthetic set (8000")
    assert run.synthetic and run.train.linear_probe
    for spelling in ("none", "{}"):
        assert apply_overrides(get_recipe("tiny_cpu"), [f"synthetic={spelling}"]).synthetic == {}
    with pytest.raises(ValueError, match="only 'none'"):
        apply_overrides(get_recipe("tiny_cpu"), ["synthetic=num_train=5"])


def test_vocabulary_follows_the_tokenizer_padded_by_the_recipe_rule(shards):
    from ov2_megatron.config import geometry

    run = own(shards, recipe="vit_l14")  # the recipe says 32000
    data_sources.choose_sources(run)
    note = data_sources.check_data(run, dp_size=1)[-1]
    assert run.model.decoder.vocab_size == 128
    assert geometry(run.model, run.parallel).padded_vocab == 1024  # vit_l14 pads to 1024
    assert "model.decoder.vocab_size 128 from the tokenizer" in note and "padded to 1024" in note


def test_an_explicit_vocabulary_that_differs_from_the_tokenizer_is_refused(shards):
    run = own(shards, "model.decoder.vocab_size=200")
    data_sources.choose_sources(run)
    with pytest.raises(ValueError) as info:
        data_sources.check_data(run, dp_size=1)
    message = str(info.value)
    assert "model.decoder.vocab_size 200 (given with --set)" in message
    assert "the 128 pieces of tokenizer" in message
    assert "set model.decoder.vocab_size=128" in message
    run = own(shards, "model.decoder.vocab_size=128")
    data_sources.choose_sources(run)
    assert "128 as given with --set" in data_sources.check_data(run, dp_size=1)[-1]


def one_sample_shard(tmp_path) -> str:
    return write_raw_shard(str(tmp_path / "val-000000.tar"),
                           [("s0", {"jpg": jpeg_bytes(0), "txt": b"sample 0"})])


def test_a_validation_set_smaller_than_the_data_parallel_size_is_refused(shards, tmp_path):
    run = own(shards, f"data.val_shards={one_sample_shard(tmp_path)}")
    data_sources.choose_sources(run)
    data_sources.check_data(run, dp_size=1)
    with pytest.raises(ValueError, match=r"has 1 sample\(s\) but the data-parallel size is 2"):
        data_sources.check_data(run, dp_size=2)


def test_missing_index_files_are_said_and_a_torn_one_refused(shards, tmp_path):
    import shutil

    shard = shutil.copy(sorted(os.path.join(shards.val_dir, n) for n in
                               os.listdir(shards.val_dir) if n.endswith(".tar"))[0], tmp_path)
    run = own(shards, f"data.val_shards={shard}")
    data_sources.choose_sources(run)
    notes = data_sources.check_data(run, dp_size=2)  # counted from the tar itself
    assert "training shards: 4, DALI index files present" in notes
    assert any("validation shards: 1, index files missing for 1" in n and
               "makes them on first use, beside them" in n for n in notes)
    with open(shard[:-len(".tar")] + ".idx", "w") as f:
        f.write("garbage\n")
    with pytest.raises(ValueError, match="not 'v1.2 N'"):
        data_sources.check_data(run, dp_size=1)


def test_train_tokenizer_states_the_recipes_padding_rule():
    from ov2_megatron.recipes import vocab_rule

    rule = vocab_rule(100)
    assert "the model pads it to 1024 for vit_l14, vit_1b (a multiple of 1024)" in rule
    assert "128 for tiny_cpu (a multiple of 128)" in rule
    assert "model.decoder.vocab_size follows data.tokenizer_model by itself" in rule


def test_a_weighted_mixture_is_not_split_for_validation(shards):
    run = own(shards)
    run.data.train_shards = f'[{{"path": "{shards.train_dir}", "weight": 1}}]'
    notes = data_sources.choose_sources(run)
    assert notes[1].startswith("validation: none (data.val_shards is empty and a weighted")
    assert run.data.val_shards == ""
