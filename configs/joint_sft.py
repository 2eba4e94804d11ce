"""Joint SFT (Kimi-VL report section 2.4; docs/recipe.md).

Text and multimodal ChatML conversations, loss on assistant turns only, packed rows; all
parameters train. Two phases: one epoch at 32K tokens with LR 2e-5 -> 2e-6, then one epoch at
128K re-warmed to 1e-5 -> 1e-6. Starts from the long-context stage's checkpoint.

  python -m kimi_vl_jax.main --config=configs/joint_sft.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=orbax:LONG_CTX_RUN
  python -m kimi_vl_jax.main --config=configs/joint_sft.py:tiny --workdir=/tmp/kimi_vl_tiny

The tiny variant trains a small model from scratch on the bundled demo data (easy-vqa image
questions and captions + arithmetic word problems) and reports the easy-vqa answer accuracy of
greedy decoding (`--config.train.blank_images=True` is the ablation with every image blanked out).
"""

from kimi_vl_jax.train import stage_config as sc

# Steps of one epoch at each length: set to (SFT tokens / (seq_len x global rows)) for your data.
EPOCH_STEPS_32K = 3000
EPOCH_STEPS_128K = 1200


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('joint_sft', arg)
  if arg == 'tiny':
    c.model = 'demo'
    # 74% of easy-vqa questions are yes/no, most of which the question text alone answers; the
    # shape / color questions and the captions ("A blue circle.") are upweighted: they name what
    # the image shows.
    c.data.sources = [
        sc.source('easy_vqa', 'chat', 'demo:easy_vqa/train.jsonl', 0.35),
        sc.source('easy_vqa_open', 'chat', 'demo:easy_vqa/train_open.jsonl', 0.25),
        sc.source('captions', 'caption', 'demo:easy_vqa/captions_train.jsonl', 0.3),
        sc.source('arithmetic', 'chat', 'demo:arithmetic/train.jsonl', 0.1),
    ]
    c.data.seq_len = 256
    c.data.batch_size = 8
    # 64x64 easy-vqa images stay at full size: padded to 84x84 = 6x6 patches = 9 image tokens.
    c.data.max_patches = 288
    c.data.max_images = 8
    c.data.image = {'max_patches': 36}
    # Two phases as in the full recipe (there 32K then 128K); here the same row length.
    c.phases = [
        {'name': 'sft_short', 'steps': 900, 'data': {'seq_len': 256}},
        {'name': 'sft_long', 'steps': 100, 'data': {'seq_len': 256}},
    ]
    c.optim.schedule = {'kind': 'multi_phase', 'phases': [
        {'steps': 900, 'warmup_steps': 30, 'peak_lr': 6e-3, 'end_lr': 6e-4},
        {'steps': 100, 'warmup_steps': 10, 'peak_lr': 2e-3, 'end_lr': 2e-4},
    ]}
    c.optim.weight_decay = 0.01
    c.checkpoint.interval = 100
    c.eval.every = 0       # at the end of each phase
    c.eval.batches = 0
    c.eval.answer_file = 'demo:easy_vqa/test.jsonl'
    c.eval.answer_examples = 500
    c.eval.answer_batch = 50
    c.eval.max_new_tokens = 4
    return c

  c.init_from = 'orbax:{long_context_run}'  # set --config.init_from=orbax:WORKDIR
  c.data.sources = [
      sc.source('text_sft', 'chat', '{data_dir}/sft/text.array_record', 0.5),
      sc.source('multimodal_sft', 'chat', '{data_dir}/sft/multimodal.array_record', 0.5),
  ]
  c.data.seq_len = 32768
  c.data.batch_size = 1
  c.data.max_patches = 65536
  c.data.max_images = 256
  c.phases = [
      {'name': 'sft_32k', 'steps': EPOCH_STEPS_32K, 'data': {'seq_len': 32768}},
      {'name': 'sft_128k', 'steps': EPOCH_STEPS_128K,
       'data': {'seq_len': 131072, 'max_patches': 262144, 'max_images': 1024}},
  ]
  c.optim.schedule = {'kind': 'multi_phase', 'phases': [
      {'steps': EPOCH_STEPS_32K, 'warmup_steps': 50, 'peak_lr': 2e-5, 'end_lr': 2e-6},
      {'steps': EPOCH_STEPS_128K, 'warmup_steps': 50, 'peak_lr': 1e-5, 'end_lr': 1e-6},
  ]}
  c.parallel.context = 4
  c.parallel.rules = 'fsdp_ep_cp'
  c.model_overrides.text = {'rope_theta': 800000.0}
  c.eval.every = 500
  c.eval.data = {'sources': [sc.source('heldout', 'chat', '{data_dir}/sft/heldout.jsonl')]}
  return c
