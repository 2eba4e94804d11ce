"""Mesh construction and start-up config validation on 8 emulated CPU devices."""

import jax
import pytest
from jax.sharding import AxisType

from kimi_vl_jax.model import config as model_config
from kimi_vl_jax.parallel import mesh as mesh_lib


def _cfg(**kw):
  c = mesh_lib.default_config()
  c.update(kw)
  return c


def test_make_mesh_resolves_minus_one_and_orders_axes():
  mesh = mesh_lib.make_mesh(_cfg(data=-1, expert=2, context=2))
  assert mesh.axis_names == ('data', 'expert', 'pipeline', 'context')
  assert mesh.devices.shape == (2, 2, 1, 2)
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_device_subset():
  mesh = mesh_lib.make_mesh(_cfg(data=2, expert=2), devices=jax.devices()[:4])
  assert mesh_lib.mesh_sizes(mesh) == {'data': 2, 'expert': 2, 'pipeline': 1, 'context': 1}


@pytest.mark.parametrize('kw, msg', [
    (dict(data=2, expert=2), r'= 4 but the job has 8 devices'),
    (dict(data=-1, expert=-1), r'at most one of'),
    (dict(data=-1, expert=3), r'not divisible by the fixed axes'),
    (dict(data=0), r'must be positive'),
    (dict(dcn_data=2), r'job \(1 slice\(s\)\)'),
])
def test_bad_axis_sizes_fail_with_the_field_to_change(kw, msg):
  with pytest.raises(ValueError, match=msg):
    mesh_lib.make_mesh(_cfg(**kw))


def test_multislice_shape_split_between_ici_and_dcn():
  ici, dcn = mesh_lib.mesh_shape(_cfg(data=-1, expert=4, dcn_data=-1), 64, num_slices=2)
  assert ici == (8, 4, 1, 1) and dcn == (2, 1, 1, 1)


def test_check_reports_every_problem_at_once():
  par = _cfg(data=2, expert=4, rules='dp_ep', context=1)
  with pytest.raises(ValueError) as e:
    mesh_lib.check(par, num_devices=8, global_batch=12, num_experts=6, num_moe_layers=2)
  text = str(e.value)
  assert 'global batch size 12' in text and 'multiple of 8' in text
  assert '6 routed experts' in text and 'parallel.expert=4' in text


def test_check_seq_len_pipeline_and_rules():
  with pytest.raises(ValueError, match=r'data.seq_len=100 .* 2 x parallel.context = 8'):
    mesh_lib.check(_cfg(data=2, context=4, rules='dp_cp'), num_devices=8, seq_len=100)
  with pytest.raises(ValueError, match=r'26 pipelined decoder layers.*pipeline=4'):
    mesh_lib.check(_cfg(data=2, pipeline=4, rules='dp_ep_pp'), num_devices=8,
                   num_moe_layers=26, num_dense_layers=1)
  with pytest.raises(ValueError, match=r"do not shard experts.*'dp_ep'"):
    mesh_lib.check(_cfg(data=2, expert=4, rules='dp'), num_devices=8, num_experts=8)
  with pytest.raises(ValueError, match=r"parallel.rules='nope' is not a rule preset"):
    mesh_lib.check(_cfg(rules='nope'), num_devices=8)
  with pytest.raises(ValueError, match=r'24 is not divisible by the 16 host processes'):
    mesh_lib.check(_cfg(data=1, expert=8, rules='dp_ep'), num_devices=8, global_batch=24,
                   num_processes=16)


def test_check_accepts_a_consistent_config():
  sizes = mesh_lib.check(_cfg(data=-1, expert=2, context=2, rules='fsdp_ep_cp'), num_devices=8,
                         global_batch=8, seq_len=64, num_experts=8, num_moe_layers=2)
  assert sizes == {'data': 2, 'expert': 2, 'pipeline': 1, 'context': 2}


def test_validate_reads_the_stage_config_and_model_preset():
  import ml_collections
  cfg = ml_collections.ConfigDict()
  cfg.model = 'tiny'
  cfg.parallel = _cfg(data=-1, expert=4, rules='dp_ep')
  cfg.data = ml_collections.ConfigDict({'seq_len': 64, 'global_batch_size': 8})
  assert mesh_lib.validate(cfg)['expert'] == 4
  cfg.parallel.expert = 8
  cfg.parallel.data = 1
  assert mesh_lib.validate(cfg)['expert'] == 8  # tiny has 8 experts
  mc = model_config.tiny()
  mc = mc.replace(text=mc.text.__class__(**{**mc.text.__dict__, 'n_routed_experts': 12}))
  with pytest.raises(ValueError, match='12 routed experts'):
    mesh_lib.validate(cfg, model_config=mc)
