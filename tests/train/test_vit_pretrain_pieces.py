"""The MoonViT pre-training pieces together on one caption batch: data/caption_pairs.py ->
MoonViT (tiny) -> caption decoder + SigLIP loss (train/coca_loss.py). The image pooling and the
text tower are test stand-ins (mean of each image's patches; mean of token embeddings), not the
stage's towers. A few SGD steps on the batch lower the loss and train every piece."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.data import caption_pairs
from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.model import caption_decoder, siglip_loss
from kimi_vl_jax.model.config import tiny
from kimi_vl_jax.model.vision import MoonViT
from kimi_vl_jax.train import coca_loss
from tests.data.data_helpers import write_jsonl, write_png


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
  root = tmp_path_factory.mktemp('captions')
  recs = []
  for k in range(6):
    write_png(str(root / f'{k}.png'), (28 * (1 + k % 2), 28), seed=k)
    recs.append({'image': f'{k}.png', 'caption': ['A red circle.', 'A blue square.'][k % 2]})
  path = write_jsonl(str(root / 'c.jsonl'), recs)
  cfg = caption_pairs.CaptionBatchConfig(batch_size=2, max_patches=20, max_images=4,
                                         caption_len=32, text_len=8)
  b = next(caption_pairs.CaptionPairIterator(path, tok_lib.SentencePieceTokenizer(), cfg, 64))
  return {k: jnp.asarray(v) for k, v in b.items() if k != '_stats'}


@pytest.mark.slow   # compiles MoonViT + decoder value_and_grad: ~40 s on a loaded 2-core CPU
def test_a_few_steps_lower_the_combined_loss(batch):
  vcfg = tiny().vision
  dcfg = caption_decoder.get_caption_preset('tiny', vision_dim=vcfg.hidden_size)
  vit, dec = MoonViT(vcfg), caption_decoder.CaptionDecoder(dcfg)
  b = batch
  I = b['image_grid_hws'].shape[1]
  k = jax.random.split(jax.random.key(0, impl='rbg'), 3)   # rbg: faster to compile on CPU

  def init():
    feats = jnp.zeros(b['patches'].shape[:2] + (vcfg.hidden_size,))
    return {
        'vit': vit.init(k[0], b['patches'], b['patch_coords'], b['patch_image_ids'],
                        b['image_grid_hws'])['params'],
        'dec': dec.init(k[1], b['caption_tokens'], b['caption_positions'],
                        b['caption_image_ids'], feats, b['patch_image_ids'])['params'],
        'txt': 0.1 * jax.random.normal(k[2], (dcfg.vocab_size, vcfg.hidden_size)),
        'siglip': siglip_loss.init_params(),
    }

  def loss_fn(p):
    feats = vit.apply({'params': p['vit']}, b['patches'], b['patch_coords'],
                      b['patch_image_ids'], b['image_grid_hws'])               # [B, P, D]
    onehot = (b['patch_image_ids'][..., None] == jnp.arange(1, I + 1)).astype(jnp.float32)
    zimg = jnp.einsum('bpi,bpd->bid', onehot, feats) / jnp.maximum(onehot.sum(1), 1)[..., None]
    tmask = (b['text_tokens'] != 1012).astype(jnp.float32)                      # [PAD]
    ztxt = jnp.einsum('bil,bild->bid', tmask, p['txt'][b['text_tokens']])
    zimg = siglip_loss.l2_normalize(zimg.reshape(-1, zimg.shape[-1]))
    ztxt = siglip_loss.l2_normalize(ztxt.reshape(-1, ztxt.shape[-1]))
    logits = dec.apply({'params': p['dec']}, b['caption_tokens'], b['caption_positions'],
                       b['caption_image_ids'], feats, b['patch_image_ids'])
    return coca_loss.vit_pretrain_loss(
        zimg, ztxt, p['siglip']['log_temperature'], p['siglip']['bias'], logits,
        b['caption_targets'], b['caption_loss_mask'], valid=b['image_valid'].reshape(-1))

  @jax.jit
  def step(p):
    (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    return jax.tree.map(lambda x, d: x - 0.05 * d, p, g), loss, m, g

  assert float(b['image_valid'].sum()) < b['image_valid'].size   # some empty slots
  p = jax.jit(init)()
  losses = []
  for _ in range(4):
    p, loss, m, g = step(p)
    losses.append(float(loss))
    if len(losses) == 1:
      first = m
      for part in ('vit', 'dec', 'txt'):
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g[part]))
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[part])) > 0, part
  np.testing.assert_allclose(losses[0], float(first['siglip_loss'])
                             + 2 * float(first['caption_loss']), rtol=1e-5)
  assert losses[-1] < losses[0], losses
