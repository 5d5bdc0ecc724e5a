"""A checkpoint records the tokenizer it was trained with, and a resume or a stage 2 with
another one is refused before any step. The case that matters has the same vocabulary size:
the model's shapes match, the weights load, and the decoder would silently learn every caption
under new token meanings. tools/caption.py refuses one too. A tokenizer trained again to the
same vocabulary is accepted."""

import json
import os

import numpy as np
import pytest

from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.training.test_resume import dataset_cache, tiny  # noqa: F401 (fixture)


def _captions() -> list[str]:
    from ov2_megatron.data.synthetic import caption_of, draw_scene

    return [caption_of(*draw_scene(np.random.default_rng([0, 0, i]))) for i in range(256)]


def tokenizer_checks(stage1: str, stage2: str, work: str) -> dict:
    from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer
    from ov2_megatron.training import loop

    run = tiny(stage1, ["train.steps=1"])
    loop.train(run)
    trained_with = CaptionTokenizer.from_file(run.data.tokenizer_model)
    captions = _captions()
    # Same 128 pieces, other ids (trained on upper-cased captions); and the same vocabulary
    # trained again into another file (word order reversed: BPE learns the same merges).
    other = train_tokenizer([c.upper() for c in captions], os.path.join(work, "other"), 128)
    again = train_tokenizer([" ".join(c.split()[::-1]) for c in captions],
                            os.path.join(work, "again"), 128)
    result = dict(pieces=[CaptionTokenizer.from_file(p).vocab_size
                          for p in (run.data.tokenizer_model, other, again)],
                  fingerprint=trained_with.fingerprint(), errors={},
                  trained_with=os.path.abspath(run.data.tokenizer_model))
    attempts = {"resume": tiny(stage1, ["train.steps=2", f"data.tokenizer_model={other}"]),
                "stage 2": tiny(stage2, ["train.steps=1", f"train.init_from={stage1}",
                                         f"data.tokenizer_model={other}"])}
    for name, attempt in attempts.items():
        try:
            loop.train(attempt)
        except ValueError as error:
            result["errors"][name] = str(error)
    result["accepted"] = loop.train(tiny(stage1, ["train.steps=2",
                                                  f"data.tokenizer_model={again}"]))["step"]
    result["caption"] = _caption_with(stage1, other, work)
    return result


def _caption_with(run_dir: str, tokenizer: str, work: str) -> tuple[int, str]:
    """tools/caption.py on the run's checkpoint with --tokenizer: (exit code, stderr)."""
    import contextlib
    import importlib.util
    import io

    from PIL import Image

    image = os.path.join(work, "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(image)
    spec = importlib.util.spec_from_file_location("caption", os.path.join(ROOT, "tools",
                                                                          "caption.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = tool.main(["--checkpoint", run_dir, "--images", image, "--tokenizer", tokenizer])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenizer")
    result = run_distributed(tokenizer_checks, 1, timeout=300,
                             args=(str(tmp / "s1"), str(tmp / "s2"), str(tmp)))[0]
    return tmp, result


def test_the_checkpoint_records_its_tokenizer(checked):
    tmp, result = checked
    with open(tmp / "s1" / "checkpoints" / "step_00000001" / "meta.json") as f:
        saved = json.load(f)["tokenizer"]
    assert saved["pieces"] == 128 and saved["fingerprint"] == result["fingerprint"]


@pytest.mark.parametrize("attempt", ["resume", "stage 2"])
def test_another_tokenizer_of_the_same_size_is_refused(checked, attempt):
    tmp, result = checked
    assert result["pieces"] == [128, 128, 128]  # shapes alone would not notice
    message = result["errors"][attempt]
    assert message.startswith(f"data.tokenizer_model {tmp / 'other.model'} (128 pieces")
    assert f"vocabulary {result['fingerprint'][:12]}" in message  # the checkpoint's
    assert f"--set data.tokenizer_model={result['trained_with']} " in message
    assert "new train.output_dir" in message


def test_captions_refuse_another_tokenizer(checked):
    """tools/caption.py would decode every caption into other words: refused in one line."""
    tmp, result = checked
    code, err = result["caption"]
    assert code == 2, err
    # The error is one line (megatron 0.19 logs notices of its own before it).
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: --tokenizer {tmp / 'other.model'} (128 pieces"), err
    # The latest checkpoint (step 2) was resumed with the same vocabulary from again.model,
    # and records that path.
    assert line.endswith(f"--tokenizer {tmp / 'again.model'}"), err
    assert f"vocabulary {result['fingerprint'][:12]}" in line, err


def test_the_same_vocabulary_in_another_file_resumes(checked):
    _, result = checked
    assert result["accepted"] == 2
