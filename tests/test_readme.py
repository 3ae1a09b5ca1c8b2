"""The README's Python blocks run as written (tests/_readme_worker.py, 8 simulated devices)."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

import _readme_worker
from _devices import run_on_8_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_python_block_is_found():
    text = (ROOT / "README.md").read_text()
    blocks = _readme_worker.python_blocks(text)
    assert len(blocks) == text.count("```python\n") >= 8
    assert all(line > 1 and text.splitlines()[line - 2] == "```python" for line, _ in blocks)


def test_the_readme_shows_the_prelude_its_blocks_start_from():
    """The worker runs PRELUDE before the blocks (so that a block can be run alone); the README
    prints the same code, so that a reader has every name its blocks use."""
    assert _readme_worker.PRELUDE.strip() + "\n```" in (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    try:
        proc = run_on_8_devices(ROOT / "tests" / "_readme_worker.py")
    except subprocess.TimeoutExpired as e:  # name the block that did not finish
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        done = [line for line in out.splitlines() if line.startswith("ok: ")]
        pytest.fail(f"the README blocks timed out after {e.timeout} s; the last to finish: "
                    f"{done[-1] if done else 'none'} (it runs the blocks in order)")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert f"{len(_readme_worker.python_blocks((ROOT / 'README.md').read_text()))} blocks ran" in proc.stdout


def test_a_failing_block_fails_the_run(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("text\n\n```python\nx = jnp.ones(3)\n```\n\n```python\njaxbag.no_such_function(x)\n```\n")
    assert _readme_worker.run_blocks(readme) == 1
    out = capsys.readouterr().out
    assert "ok: README.md:4" in out and "FAILED: the block at README.md:8" in out
