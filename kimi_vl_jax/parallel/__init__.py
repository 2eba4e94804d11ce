"""Mesh, logical-axis rules, multi-host start-up, and the mesh-aware model kernels
(`parallel.kernels.build_kernels`: context-parallel attention, expert-parallel dispatch, the
pipeline schedule)."""
