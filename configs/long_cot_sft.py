"""Long-CoT SFT (Kimi-VL-Thinking warm-up; Kimi-VL report section 2.4; docs/recipe.md).

A small, verified set of long chain-of-thought conversations (planning, evaluation, reflection,
exploration) on text and images; a lightweight SFT after joint SFT, before RL. Loss on assistant
turns only, every parameter training, long rows.

  python -m kimi_vl_jax.main --config=configs/long_cot_sft.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=orbax:SFT_RUN
  python -m kimi_vl_jax.main --config=configs/long_cot_sft.py:tiny --workdir=/tmp/long_cot

The tiny variant's "long CoT" is the bundled arithmetic problems with worked answers of three
lengths (`data/build_demo.py` `worked_answer`: the plain answer, one that plans first, one that
plans and checks its result; about 13, 50 and 80 tokens), mixed with easy-vqa: the model it
trains answers at varied lengths, which the RL stage's length penalty shortens (`configs/rl.py`,
`init_from='demo_long_cot'`).
"""

from kimi_vl_jax.train import stage_config as sc

STEPS = 400


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('long_cot_sft', arg)
  c.model_overrides.text = {'rope_theta': 800000.0}
  if arg == 'tiny':
    c.data.sources = [
        sc.source('arith_cot', 'chat', 'demo:arithmetic/cot_train.jsonl', 0.7),
        sc.source('easy_vqa', 'chat', 'demo:easy_vqa/train.jsonl', 0.3),
    ]
    c.data.seq_len = 256
    c.data.max_patches = 192
    c.data.max_images = 12
    c.data.image = {'max_patches': 16}
    c.phases = [{'name': 'long_cot', 'steps': 200}]
    c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 1e-3, 'total_steps': 200,
                        'warmup_steps': 20, 'end_lr': 1e-4}
    c.eval.batches = 0
    return c

  c.init_from = 'orbax:{joint_sft_run}'  # set --config.init_from=orbax:WORKDIR
  c.data.sources = [
      sc.source('long_cot_text', 'chat', '{data_dir}/long_cot/text.jsonl', 0.6),
      sc.source('long_cot_multimodal', 'chat', '{data_dir}/long_cot/multimodal.jsonl', 0.4),
  ]
  c.data.seq_len = 65536
  c.data.batch_size = 1
  c.data.max_patches = 131072
  c.data.max_images = 512
  c.phases = [{'name': 'long_cot', 'steps': STEPS}]
  c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 1e-5, 'total_steps': STEPS,
                      'warmup_steps': 20, 'end_lr': 1e-6}
  c.parallel.context = 4
  c.parallel.rules = 'fsdp_ep_cp'
  c.eval.data = {'sources': [sc.source('heldout', 'chat', '{data_dir}/long_cot/heldout.jsonl')]}
  c.eval.every = 100
  return c
