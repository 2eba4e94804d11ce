"""ViT alignment (Kimi-VL report section 2.3; docs/recipe.md "ViT alignment").

0.1T tokens at 8K: MoonViT (from ViT pre-training) and the MLP projector train, the language
model is frozen (`optim.trainable`: only `vision_tower/` and `projector/`; every other
parameter gets no gradient, no optimizer state and no update), so the image features learn to fit
the language model before joint pre-training. An ordinary `KimiVL` LM-loss stage of the one loop:
next-token loss on image captions and image QA, through the frozen LLM.

Initialisation merges two sources (`train/init.py`, `init_from='BASE,SUBTREE=SOURCE'`): the
language model from the Moonlight checkpoint (an HF text-only DeepSeek-V3 directory), MoonViT
from the ViT pre-training run's checkpoint, the projector from scratch:

  python -m kimi_vl_jax.main --config=configs/vit_align.py --workdir=RUN \\
      --config.data_dir=DATA --config.tokenizer.path=TIKTOKEN \\
      --config.init_from=scratch,language_model=hf:MOONLIGHT_DIR,vision_tower=orbax:VIT_PRETRAIN_RUN
  python -m kimi_vl_jax.main --config=configs/vit_align.py:tiny --workdir=/tmp/vit_align \\
      --config.init_from=scratch,vision_tower=orbax:/tmp/vit_pretrain

The tiny variant is the `demo` preset (whose MoonViT `configs/vit_pretrain.py:tiny` trains) on
the bundled easy-vqa captions and questions. The recipe's language model exists before this
stage (Moonlight, 5.2T text tokens); the tiny chain has no pre-trained tiny language model, so
its LLM is random and stays frozen: the stage then checks the mechanics (vision from the ViT
pre-training checkpoint, the LLM frozen bit for bit, gradients through it into the projector
and MoonViT), and its loss falls only as far as image tokens can steer a random LM. Without the
`vision_tower=` part it starts MoonViT from scratch too.
"""

from kimi_vl_jax.train import stage_config as sc

TOKENS = 0.1e12
TRAINABLE = ('^vision_tower/', '^projector/')


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('vit_align', arg)
  c.optim.trainable = TRAINABLE
  c.model_overrides.text = {'rope_theta': 50000.0}
  if arg == 'tiny':
    c.model = 'demo'
    c.data.sources = [
        sc.source('captions', 'caption', 'demo:easy_vqa/captions_train.jsonl', 0.5),
        sc.source('easy_vqa_open', 'chat', 'demo:easy_vqa/train_open.jsonl', 0.5),
    ]
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.data.max_patches = 288
    c.data.max_images = 8
    c.data.image = {'max_patches': 36}   # the resolution vit_pretrain:tiny ends at
    steps = 100
    c.phases = [{'name': 'align', 'steps': steps}]
    c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 2e-3, 'total_steps': steps,
                        'warmup_steps': 10, 'end_lr': 2e-4}
    c.optim.weight_decay = 0.01
    c.checkpoint.interval = 100
    c.eval.every = 0
    c.eval.batches = 4
    c.eval.data = {'sources': [sc.source('captions_test', 'caption',
                                         'demo:easy_vqa/captions_test.jsonl')]}
    return c

  c.init_from = 'scratch,language_model=hf:{moonlight_dir},vision_tower=orbax:{vit_pretrain_run}'
  c.data.sources = [
      sc.source('caption', 'caption', '{data_dir}/align/caption.array_record', 0.7),
      sc.source('interleaved', 'chat', '{data_dir}/align/interleaved.array_record', 0.15),
      sc.source('ocr_grounding', 'chat', '{data_dir}/align/ocr_grounding.array_record', 0.15),
  ]
  c.data.batch_size = sc.A3B_ROWS_PER_HOST
  steps = sc.tokens_to_steps(TOKENS, 8192, sc.A3B_GLOBAL_ROWS)
  c.phases = [{'name': 'align', 'steps': steps}]
  c.optim.schedule = {'kind': 'warmup_cosine', 'peak_lr': 2e-4, 'total_steps': steps,
                      'warmup_steps': 500, 'end_lr': 2e-5}
  c.eval.data = {'sources': [sc.source('heldout', 'caption', '{data_dir}/align/heldout.jsonl')]}
  c.eval.every = 2000
  return c
