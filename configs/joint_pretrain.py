"""Joint pre-training (Kimi-VL report section 2.3; docs/recipe.md).

1.4T tokens of text + multimodal data at 8K, every parameter training, the multimodal share
ramping up over the stage (set by the source weights of successive runs/phases); continues the
LLM's LR schedule. RoPE base 50000 until the long-context stage. Starts from the language model
plus the ViT after alignment (`init_from=params:DIR`, e.g. written by checkpoint.convert).

  python -m kimi_vl_jax.main --config=configs/joint_pretrain.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN --config.init_from=params:ALIGNED
  python -m kimi_vl_jax.main --config=configs/joint_pretrain.py:tiny --workdir=/tmp/pretrain
"""

from kimi_vl_jax.train import stage_config as sc

TOKENS = 1.4e12


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('joint_pretrain', arg)
  c.model_overrides.text = {'rope_theta': 50000.0}
  if arg == 'tiny':
    c.data.sources = sc.tiny_pretrain_sources()
    c.data.seq_len = 256
    c.data.max_patches = 192
    c.data.max_images = 12
    c.data.image = {'max_patches': 16}
    c.phases = [{'name': 'pretrain', 'steps': 200}]
    c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 3e-3, 'total_steps': 200,
                        'warmup_steps': 20, 'end_lr': 3e-4}
    c.eval.batches = 2
    c.eval.every = 100
    return c

  c.init_from = 'params:{aligned_llm_and_vit}'  # set --config.init_from=params:DIR
  c.data.sources = [
      sc.source('text', 'text', '{data_dir}/pretrain/text.array_record', 0.6),
      sc.source('caption', 'caption', '{data_dir}/pretrain/caption.array_record', 0.15),
      sc.source('interleaved', 'chat', '{data_dir}/pretrain/interleaved.array_record', 0.1),
      sc.source('ocr_grounding', 'chat', '{data_dir}/pretrain/ocr_grounding.array_record', 0.1),
      sc.source('vqa', 'chat', '{data_dir}/pretrain/vqa.array_record', 0.05),
  ]
  c.data.batch_size = sc.A3B_ROWS_PER_HOST
  steps = sc.tokens_to_steps(TOKENS, 8192, sc.A3B_GLOBAL_ROWS)
  c.phases = [{'name': 'pretrain', 'steps': steps}]
  c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 3e-4, 'total_steps': steps,
                      'warmup_steps': 500, 'end_lr': 3e-5}
  c.train.grad_accum = 2
  c.eval.data = {'sources': [sc.source('heldout', 'text', '{data_dir}/pretrain/heldout.jsonl')]}
  c.eval.every = 2000
  return c
