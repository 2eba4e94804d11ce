"""MoonViT pre-training (Kimi-VL report section 2.3; docs/recipe.md "ViT training").

MoonViT, initialised from SigLIP-SO400M, trains on image-text pairs with `L = L_siglip +
2 L_caption`: the SigLIP sigmoid loss between the pooled image embedding and SigLIP's text tower
(ring form over the data axis), plus next-token prediction of the caption by a small decoder
reading MoonViT's patch features. Progressive resolution: the per-image patch budget grows over
the steps (`data.resolution`). Runs through the one training loop (`train/vit_pretrain.py`).

  python -m kimi_vl_jax.main --config=configs/vit_pretrain.py --workdir=RUN \\
      --config.data_dir=DATA --config.init_from=siglip:SIGLIP_SO400M_DIR \\
      --config.tokenizer.path=SIGLIP_SO400M_DIR/spiece.model
  python -m kimi_vl_jax.main --config=configs/vit_pretrain.py:tiny --workdir=/tmp/vit_pretrain

The tiny variant trains the `demo` preset's MoonViT (the tower `configs/vit_align.py:tiny` and
the joint stages load) from scratch with a tiny text tower and caption decoder on the bundled
easy-vqa image captions ("A blue circle.": 3 shapes x 8 colours), and reports zero-shot accuracy
of the easy-vqa test images against the 24 captions and image <-> text recall@1/@5.
"""

from kimi_vl_jax.train import stage_config as sc

COLORS = ('red', 'green', 'blue', 'black', 'gray', 'teal', 'brown', 'yellow')  # easy-vqa's
SHAPES = ('circle', 'rectangle', 'triangle')
# The full recipe: 2.0T tokens (here: image patches) at rows of 8K patches.
TOKENS = 2.0e12
ROW_PATCHES = 8192


def easy_vqa_class_prompts() -> list[str]:
  """The 24 captions of the bundled easy-vqa images ('A red circle.', ...), as
  `data/build_demo.py` writes them: the zero-shot classes."""
  return [f'A {c} {s}.' for s in SHAPES for c in COLORS]


def get_config(arg: str = ''):
  arg = sc.check_variant(arg)
  c = sc.base('vit_pretrain', arg)
  c.train.z_loss_weight = 0.0
  c.train.siglip_weight = 1.0
  c.train.caption_weight = 2.0
  c.text_tokenizer = None
  if arg == 'tiny':
    c.model = 'demo'              # its MoonViT: 96 wide, 3 layers (what vit_align:tiny loads)
    c.text_tower = {'preset': 'tiny', 'vocab_size': 1024, 'hidden_size': 64,
                    'intermediate_size': 128, 'num_layers': 2, 'num_heads': 4,
                    'max_position_embeddings': 16}
    c.caption_decoder = {'preset': 'tiny'}
    c.data = {
        'sources': [sc.source('captions', 'caption', 'demo:easy_vqa/captions_train.jsonl')],
        # 8 rows of 288 patches, up to 8 images each: 64 image-caption pairs per step.
        'batch_size': 8, 'max_patches': 288, 'max_images': 8, 'caption_len': 64,
        'text_len': 8,
        # Progressive resolution: the 64x64 images shrunk to 4x4 patches (at most 9 before
        # padding), then from step 100 at full size (6x6 patches).
        'resolution': '0:9,100:36',
        'image': {},
    }
    steps = 400
    c.phases = [{'name': 'vit_pretrain', 'steps': steps}]
    c.optim.schedule = {'kind': 'warmup_cosine', 'warmup_steps': 20, 'peak_lr': 1e-2,
                        'end_lr': 1e-3, 'total_steps': steps}
    c.optim.weight_decay = 0.01
    c.checkpoint.interval = 200
    c.eval = {'every': 0, 'caption_file': 'demo:easy_vqa/captions_test.jsonl',
              'class_prompts': easy_vqa_class_prompts(), 'examples': 0, 'galleries': 10,
              'batch_size': 16}
    return c

  c.model = 'kimi_vl_a3b'         # its MoonViT: SigLIP-SO400M's shape
  c.init_from = 'siglip:{siglip_so400m_dir}'  # set --config.init_from=siglip:DIR
  c.text_tower = {'preset': 'so400m'}
  c.caption_decoder = {'preset': 'so400m'}
  c.tokenizer = {'kind': 'siglip', 'path': '{siglip_so400m_dir}/spiece.model'}
  rows = sc.A3B_ROWS_PER_HOST * 4          # 64 rows of 8K patches per host
  global_rows = rows * sc.A3B_HOSTS
  c.data = {
      'sources': [sc.source('image_text', 'caption', '{data_dir}/vit/image_text.jsonl')],
      'batch_size': rows, 'max_patches': ROW_PATCHES, 'max_images': 64, 'caption_len': 2048,
      'text_len': 64, 'num_workers': 8,
      # *repo*: the report says only that larger sizes are allowed gradually.
      'resolution': '0:256,20000:1024,40000:4096',
      'image': {'max_patches': 4096},
  }
  steps = sc.tokens_to_steps(TOKENS, ROW_PATCHES, global_rows)
  c.phases = [{'name': 'vit_pretrain', 'steps': steps}]
  c.optim.schedule = {'kind': 'warmup_cosine', 'warmup_steps': 2000, 'peak_lr': 1e-4,
                      'end_lr': 1e-5, 'total_steps': steps}
  c.parallel.expert = 1
  c.parallel.rules = 'fsdp'
  c.train.loss_chunk_tokens = 0
  c.eval = {'every': 5000, 'caption_file': '{data_dir}/vit/heldout.jsonl',
            'class_prompts': [], 'examples': 10000, 'galleries': 10, 'batch_size': 0}
  return c
