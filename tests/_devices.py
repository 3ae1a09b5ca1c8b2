"""Runs a test worker script in a fresh ``python`` with 8 simulated CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if set before jax is
imported, and the pytest process has imported jax already (conftest), so multi-device checks
run their worker in a subprocess.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


# XLA:CPU aborts the process when a collective's 8 device threads have not all arrived within
# 40 s; on a loaded 2-core machine (pytest-xdist workers, a CI neighbour) they can be that late
# without any deadlock (a README example aborted so once), so the harness waits longer.
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")


def run_on_8_devices(script: pathlib.Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python script *args`` from the repository root on 8 CPU devices; output captured."""
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
