"""Reading config sections that may be an `ml_collections.ConfigDict`, a dict or unset."""

from __future__ import annotations

from typing import Any


def as_dict(cfg: Any) -> dict:
  """A plain (shallow-copied) dict of a ConfigDict / FrozenConfigDict / mapping; {} for None."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return dict(cfg)
