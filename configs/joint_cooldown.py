"""Joint cooldown (Kimi-VL report section 2.3; docs/recipe.md).

0.6T tokens at 8K of high-quality text, high-quality multimodal data and synthetic QA (rephrased
math / knowledge / code, image QA), every parameter training, the LR decayed linearly to a low
value. Continues from the joint pre-training run (`init_from=orbax:WORKDIR`).

  python -m kimi_vl_jax.main --config=configs/joint_cooldown.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=orbax:PRETRAIN_RUN
  python -m kimi_vl_jax.main --config=configs/joint_cooldown.py:tiny --workdir=/tmp/cooldown
"""

from kimi_vl_jax.train import stage_config as sc

TOKENS = 0.6e12


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('joint_cooldown', arg)
  c.model_overrides.text = {'rope_theta': 50000.0}
  if arg == 'tiny':
    c.data.sources = [
        sc.source('arith_chat', 'chat', 'demo:arithmetic/train.jsonl', 0.4),
        sc.source('captions', 'caption', 'demo:easy_vqa/captions_train.jsonl', 0.2),
        sc.source('easy_vqa', 'chat', 'demo:easy_vqa/train.jsonl', 0.4),
    ]
    c.data.seq_len = 256
    c.data.max_patches = 192
    c.data.max_images = 12
    c.data.image = {'max_patches': 16}
    c.phases = [{'name': 'cooldown', 'steps': 100}]
    c.optim.schedule = {'kind': 'warmup_linear', 'peak_lr': 1e-3, 'total_steps': 100,
                        'warmup_steps': 10, 'end_lr': 1e-5}
    return c

  c.init_from = 'orbax:{joint_pretrain_run}'  # set --config.init_from=orbax:WORKDIR
  c.data.sources = [
      sc.source('hq_text', 'text', '{data_dir}/cooldown/text.array_record', 0.5),
      sc.source('synthetic_qa', 'chat', '{data_dir}/cooldown/synthetic_qa.array_record', 0.2),
      sc.source('hq_multimodal', 'chat', '{data_dir}/cooldown/multimodal.array_record', 0.3),
  ]
  c.data.batch_size = sc.A3B_ROWS_PER_HOST
  steps = sc.tokens_to_steps(TOKENS, 8192, sc.A3B_GLOBAL_ROWS)
  c.phases = [{'name': 'cooldown', 'steps': steps}]
  c.optim.schedule = {'kind': 'warmup_linear', 'peak_lr': 3e-5, 'total_steps': steps,
                      'warmup_steps': 0, 'end_lr': 3e-6, 'init_lr': 3e-5}
  c.train.grad_accum = 2
  c.eval.data = {'sources': [sc.source('heldout', 'text', '{data_dir}/cooldown/heldout.jsonl')]}
  c.eval.every = 2000
  return c
