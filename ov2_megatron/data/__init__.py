"""Image-caption data path: shards -> DALI decode/augment -> fixed-length caption tokens.

    config.py          DataConfig (+ validate, shard resolution before any compute)
    shards.py          webdataset tar writer with DALI index files, plain reader
    sample_checks.py   what makes a sample bad: header checks (in-pipeline) and full decode
    prepare.py         folder/table -> validated shards (tools/prepare_shards.py)
    tokenizer.py       SentencePiece CaptionTokenizer, train_tokenizer
    sample_filter.py   the Python stage inside the DALI pipeline (checks + tokenization)
    dali_pipeline.py   ImageCaptionLoader: sharded, resumable, bad-data tolerant
    color_jitter.py    the official SimCLR colour jitter + random grayscale, as DALI ops
    synthetic.py       procedurally drawn shapes dataset with pixel-determined captions

Nothing here imports DALI at package import time; dali_pipeline imports it (and color_jitter)
when a pipeline is built, so configs and tokenizers load on machines without it.
"""
