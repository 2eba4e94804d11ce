"""The batch contract (`data/batch.py`): shapes from the config, validation, host/device split."""

import numpy as np
import pytest

from kimi_vl_jax.data import batch as batch_lib
from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.train import stage_config


def test_shapes_from_a_tiny_config():
  data = stage_config.base('joint_sft', 'tiny').data
  spec = BatchSpec.from_config(data, get_preset('tiny'))
  B, T, P, I = data.batch_size, data.seq_len, data.max_patches, data.max_images
  assert spec.shapes() == {
      'input_ids': ((B, T), np.int32), 'targets': ((B, T), np.int32),
      'loss_mask': ((B, T), np.float32), 'segment_ids': ((B, T), np.int32),
      'positions': ((B, T), np.int32), 'patches': ((B, P, 588), np.float32),
      'patch_coords': ((B, P, 2), np.int32), 'patch_image_ids': ((B, P), np.int32),
      'image_grid_hws': ((B, I, 2), np.int32)}
  assert spec.keys == batch_lib.KEYS
  assert BatchSpec.from_config(data, rows=64).rows == 64
  prompt = BatchSpec.from_config(data, targets=False)
  assert prompt.keys == tuple(k for k in batch_lib.KEYS if k not in ('targets', 'loss_mask'))
  text_only = BatchSpec.from_config({'batch_size': 2, 'seq_len': 8, 'max_patches': 0})
  assert text_only.zeros()['patches'].shape == (2, 0, 588)
  # Unset sizes are the pipeline's defaults; None is an error naming the field.
  assert BatchSpec.from_config({}) == BatchSpec(8, 8192, 16384, 64)
  with pytest.raises(ValueError, match='data.seq_len'):
    BatchSpec.from_config({'seq_len': None})


def test_validate_names_the_key_and_the_sizes():
  spec = BatchSpec(rows=2, seq_len=8, max_patches=4, max_images=1)
  good = spec.zeros()
  spec.validate(good)
  spec.validate({**good, '_stats': np.zeros(3)})  # host-only extras are fine
  bad = dict(good, patches=np.zeros((2, 8, 588), np.float32))
  with pytest.raises(ValueError, match=r"batch\['patches'\]: expected float32\[2, 4, 588\], got "
                                       r'float32\[2, 8, 588\] .*data.max_patches=4'):
    spec.validate(bad)
  with pytest.raises(ValueError, match=r"'loss_mask'.*expected float32\[2, 8\], got int32"):
    spec.validate(dict(good, loss_mask=np.zeros((2, 8), np.int32)))
  with pytest.raises(ValueError, match=r"missing keys \['targets'\]"):
    spec.validate({k: v for k, v in good.items() if k != 'targets'})
  with pytest.raises(ValueError, match='targets.*prompt batch'):
    spec.replace(targets=False).validate(good)


def test_split_keeps_host_extras_off_the_device_and_blanks_images():
  spec = BatchSpec(rows=2, seq_len=8, max_patches=4, max_images=1)
  rng = np.random.default_rng(0)
  batch = spec.zeros()
  batch['patches'] = rng.normal(size=(2, 4, 588)).astype(np.float32)
  batch['input_ids'] = rng.integers(1, 9, size=(2, 8)).astype(np.int32)
  batch['_stats'] = np.arange(3)
  dev, extra = spec.split(batch)
  assert set(dev) == set(batch_lib.KEYS) and set(extra) == {'_stats'}
  np.testing.assert_array_equal(dev['patches'], batch['patches'])
  blank, _ = spec.split(batch, blank_images=True)
  assert not blank['patches'].any() and batch['patches'].any()
  np.testing.assert_array_equal(blank['input_ids'], batch['input_ids'])
  with pytest.raises(ValueError, match='input_ids'):
    spec.replace(seq_len=9).split(batch)


def test_abstract_batch_carries_shapes_and_sharding():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  spec = BatchSpec(rows=8, seq_len=16, max_patches=8, max_images=2, patch_dim=12)
  sh = NamedSharding(jax.make_mesh((8,), ('data',)), P('data'))
  abstract = spec.abstract(sh)
  assert {k: (a.shape, a.dtype) for k, a in abstract.items()} == spec.shapes()
  assert all(a.sharding == sh for a in abstract.values())
  spec.validate(abstract)
