"""Optimizers: Moonlight Muon + AdamW (muon.py) and LR schedules (schedules.py)."""

from kimi_vl_jax.optim.muon import (ParamGroup, default_config, groups_summary, make_optimizer,
                                    moonlight_muon, muon_param_groups, newton_schulz)
from kimi_vl_jax.optim.schedules import (make_schedule, multi_phase, warmup_cosine,
                                         warmup_decay, warmup_linear)
