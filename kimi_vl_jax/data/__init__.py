"""The grain data pipeline (Kimi-VL report, arXiv 2504.07491, sections 2.3-2.5).

  batch.py       the batch contract: keys, shapes and dtypes from the config (BatchSpec)

  tokenizer.py   SentencePiece (tiny, bundled) and Kimi tiktoken tokenizers, one interface
  chat.py        Kimi chat rendering with the assistant-only loss mask, captions, text documents
  images.py      Kimi-VL image preprocessing, merge-order patches
  sources.py     JSONL / txt / ArrayRecord sources, record -> example (bad input skipped, logged)
  packing.py     accounting, concatenate-then-split for text, grain packing, row finalisation
  pipeline.py    make_tokenizer, make_iterator, data_stats, skip_counts (the trainer's entry points)
  build_demo.py  easy-vqa and arithmetic demo data (`python -m kimi_vl_jax.data.build_demo`)
  train_spm.py   trains assets/tiny_spm.model (`python -m kimi_vl_jax.data.train_spm`)
"""
