"""XLA flags of the test processes and of the subprocesses tests start.

Tests run tiny programs, whose time goes into compiling them: LLVM's optimisation passes cost
more than they save (`--xla_backend_optimization_level=0` roughly halves the suite's compile
time on XLA:CPU). The programs and their numerics are XLA's own either way (floating-point
results agree to rounding; a test comparing two runs bitwise runs both with these flags).
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` emulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'
