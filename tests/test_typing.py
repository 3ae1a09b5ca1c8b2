"""jaxbag ships ``py.typed``: its annotations are what users' type checkers see. mypy (the
``[tool.mypy]`` settings of pyproject.toml) must pass on the library, on a user's calls of
the public API (``typed_usage.py``: the types each call returns, and misuses refused), and on
the experiments and configs (the library's first user). pyright (``[tool.pyright]``, run by the
``basedpyright`` package, which brings its own Node.js) must pass on the library and on
``typed_usage.py`` too, and refuse each misuse there."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tokenize
import typing
from pathlib import Path

import jax

import typed_usage

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes_on_the_library_a_users_calls_and_the_experiments(tmp_path):
    """Before: 210 errors in the library (parameters re-bound to arrays, Optional values used
    unchecked, NamedTuples of specs), a ``SparseOptimizer`` typed for one table that the
    collection optimiser did not fit, and ``embedding_bag_collection`` typed ``dict | Array``
    whatever ``concat`` said; 55 in the experiments (NumPy arrays passed where ``jax.Array``
    was declared, Optionals used unchecked)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
         "jaxbag", "experiments", "configs", "tests/typed_usage.py"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _pyright(*args: str) -> subprocess.CompletedProcess[str]:
    # basedpyright's console script lies beside this interpreter (the dev extra installs it)
    exe = Path(sys.executable).with_name("basedpyright")
    return subprocess.run([str(exe), "--pythonpath", sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_pyright_passes_on_the_library_and_a_users_calls():
    """Before: 32 errors in the library (``jax.core`` used without importing it, variables
    possibly unbound on paths pyright could not rule out, ``auto_axes`` read as its decorator
    form); ``typed_usage.py``'s ``assert_type`` lines are checked by pyright's rules too."""
    proc = _pyright("jaxbag", "tests/typed_usage.py")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 errors" in proc.stdout, proc.stdout[-2000:]


def _ignored_lines(path: Path) -> set[int]:
    """The lines of ``path`` whose code ends with a ``# type: ignore[...]`` comment."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0] for t in tokens
            if t.type == tokenize.COMMENT and t.string.startswith("# type: ignore")}


def test_pyright_refuses_each_misuse(tmp_path):
    """With ``# type: ignore`` comments switched off, pyright reports an error on exactly the
    lines that carry one (``typed_usage.misuses``): each misuse is refused by pyright as by
    mypy (whose ``warn_unused_ignores`` checks the same lines), and nothing else is."""
    usage = ROOT / "tests" / "typed_usage.py"
    config = tmp_path / "pyrightconfig.json"
    config.write_text(json.dumps({"typeCheckingMode": "standard", "pythonVersion": "3.11",
                                  "enableTypeIgnoreComments": False, "extraPaths": [str(ROOT)]}))
    proc = _pyright("-p", str(config), "--outputjson", str(usage))
    report = json.loads(proc.stdout)
    flagged = {d["range"]["start"]["line"] + 1 for d in report["generalDiagnostics"]
               if d["severity"] == "error"}
    expected = _ignored_lines(usage)
    assert len(expected) >= 15, expected
    assert flagged == expected, {"not refused": sorted(expected - flagged),
                                 "unexpected": sorted(flagged - expected)}


def test_the_typed_calls_run():
    """The calls mypy checks are real ones: each function of typed_usage runs (but misuses)."""
    key = jax.random.key(0)
    typed_usage.functional()
    typed_usage.ragged()
    typed_usage.modules(key)
    typed_usage.sparse_training()
    typed_usage.collections(key)
    typed_usage.sharding()


def test_embedding_bag_rows_kwargs_are_embedding_bags_options():
    """embedding_bag_rows' **kwargs are typed as ops.BagOptions (for type checkers) and checked
    at run time against embedding_bag's keyword-only parameters: the two lists are one."""
    from jaxbag._src import ops, sparse

    options = ops.BagOptions.__annotations__
    assert set(options) == set(sparse._BAG_KWARGS)
    as_text = {k: getattr(v, "__forward_arg__", v) for k, v in options.items()}  # ForwardRef('str')
    assert as_text == {k: ops.embedding_bag.__annotations__[k] for k in options}


def _public_callables():
    import jaxbag.nnx
    import jaxbag.sharding

    for mod in (jaxbag, jaxbag.sharding, jaxbag.nnx):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type):
                for attr, member in vars(obj).items():
                    # (jaxbag's own methods: nnx.tabulate leaves flax's inherited ones in the
                    # class __dict__ of every module it tabulated)
                    if not getattr(member, "__module__", "").startswith("jaxbag."):
                        continue
                    if callable(member) and (not attr.startswith("_") or attr in ("__init__", "__call__")):
                        yield f"{mod.__name__}.{name}.{attr}", member
            elif callable(obj) and typing.get_origin(obj) is None:  # (not a type alias: Mode)
                yield f"{mod.__name__}.{name}", obj


def test_annotations_evaluate_at_run_time():
    """Tools that read annotations at run time (typing.get_type_hints: Sphinx autodoc, typeguard,
    beartype) resolve every public signature: Unpack imported for type checkers only, and the
    planner's ShardingPlan hidden behind TYPE_CHECKING, were NameErrors there."""

    failed = {}
    for where, fn in _public_callables():
        try:
            typing.get_type_hints(fn)
        except Exception as e:  # noqa: BLE001
            failed[where] = f"{type(e).__name__}: {e}"
    assert not failed, failed
