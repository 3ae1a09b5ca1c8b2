"""Runs every ```python block of README.md, in order, in one namespace (like a notebook).

Run by tests/test_readme.py in a subprocess with 8 simulated CPU devices (the sharding
snippets need a mesh; ``python tests/_readme_worker.py [README.md]``). The blocks start from :data:`PRELUDE`, the names the README's prose
takes as given; everything else a block uses, an earlier block defines. Prints one line per
block and exits non-zero at the first block that raises.
"""

import re
import sys
import traceback
from pathlib import Path

PRELUDE = '''
import functools
import jax, jax.numpy as jnp, numpy as np, optax, jaxbag
from flax import nnx

key = jax.random.key(0)
table = jax.random.normal(key, (10_000, 64))     # [V, D]
w = table
ids = jnp.array([4, 1, 2, 2, 7, 3])              # four bags: [4 1] [] [2 2 7] [3]
offsets = jnp.array([0, 2, 2, 5])
'''


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every block fenced with ```python."""
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def run_blocks(readme: Path) -> int:
    """Runs the blocks of ``readme``; 0 if all ran, 1 at the first that raised."""
    namespace: dict = {"__name__": "__readme__"}
    exec(PRELUDE, namespace)
    blocks = python_blocks(readme.read_text())
    for line, code in blocks:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception:
            traceback.print_exc()
            print(f"FAILED: the block at README.md:{line}", flush=True)
            return 1
        print(f"ok: README.md:{line}", flush=True)
    print(f"{len(blocks)} blocks ran")
    return 0


if __name__ == "__main__":
    sys.exit(run_blocks(Path(sys.argv[1]) if len(sys.argv) > 1
                        else Path(__file__).resolve().parents[1] / "README.md"))
