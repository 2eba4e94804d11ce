"""Mesh, logical-axis rules, multi-host start-up and expert-parallel MoE dispatch.

Importing the package registers the expert-parallel routed-expert implementations
(`TextConfig.moe_impl` = 'ep_capacity' | 'ep_dropless', see `parallel/expert.py`).
"""

from kimi_vl_jax.parallel import expert  # noqa: F401
