"""Image-caption data path: shards -> DALI decode/augment -> fixed-length caption tokens.

    config.py          DataConfig (+ validate, shard resolution before any compute)
    mixing.py          shard specs, plain or weighted, and the list realising a mixture
    shards.py          webdataset tar writer with DALI index files, plain reader
    shard_index.py     DALI index files for foreign shards, made on first use
    captions.py        the caption of a sample: .txt, or a (dotted) .json field / candidates
    sample_checks.py   what makes a sample bad: header checks (in-pipeline) and full decode
    bad_data.py        per-window bad-sample warning and the all-bad error (never a hang)
    prepare.py         folder/table/shards -> validated shards (tools/prepare_shards.py)
    tokenizer.py       SentencePiece CaptionTokenizer, train_tokenizer
    sample_filter.py   the Python stage inside the DALI pipeline (checks + tokenization)
    dali_pipeline.py   ImageCaptionLoader: sharded, resumable, bad-data tolerant
    color_jitter.py    the official SimCLR colour jitter + random grayscale, as DALI ops
    synthetic.py       procedurally drawn shapes dataset with pixel-determined captions

Nothing here imports DALI at package import time; dali_pipeline imports it (and color_jitter)
when a pipeline is built, so configs and tokenizers load on machines without it.
"""
