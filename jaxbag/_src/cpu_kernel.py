"""The C++ CPU kernels (XLA FFI custom calls): build on first use, cache, load, status.

The source is ``cpu_kernel.cc`` beside this module. On the first call that can use it (a float32
table on the CPU backend), it is compiled with the system C++ compiler against the XLA FFI
headers shipped in jaxlib, into a cache keyed by the source, jax / jaxlib versions, compiler and
CPU; later processes load the cached library. Every kernel has an XLA fallback that gives the
same values up to float rounding (README, "The CPU kernel"): a missing compiler, a failed build
or ``JAXBAG_DISABLE_CPU_KERNEL=1`` only costs speed (said once per process by a warning, and by
:func:`cpu_kernel_status`).

The library holds the bag forward (:mod:`jaxbag._src.fast_forward`) and the sparse training
path's kernels (:mod:`jaxbag._src.sparse_kernels`): distinct ids (hash + radix sort), the
row-gradient scatter, and fused in-place SGD / row-wise Adagrad / lazy Adam updates of the
touched rows. Callers ask :func:`kernel_ok` whether a call can take it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib.version
from jax import Array

__all__ = [
    "BAG_FORWARD",
    "ROWS_GRAD",
    "SPARSE_UPDATE",
    "UNIQUE_ROWS",
    "cpu_kernel_status",
    "in_shard_map",
    "kernel_ok",
]

# FFI target names (the handlers the library exports, registered for the CPU platform on load)
BAG_FORWARD = "jaxbag_bag_fwd_f32"
ROWS_GRAD = "jaxbag_rows_grad_f32"
UNIQUE_ROWS = "jaxbag_unique_rows"
# Fused row updates: (kind, table dtype, state dtype) -> (target, handler symbol). Tables and
# state of float32 or bfloat16; SGD has no state (its state dtype: None).
_SHORT = {"float32": "F32", "bfloat16": "BF16"}


def _update_names(kind: str, table: str, state: str | None) -> tuple[str, str]:
    parts = [_SHORT[table]] + ([_SHORT[state]] if state else [])  # e.g. BF16, F32
    return ("_".join(["jaxbag_sparse", kind, *parts]).lower(),
            f"JaxbagSparse{kind.capitalize()}{''.join(parts)}")


_UPDATES = {
    (kind, table, state): _update_names(kind, table, state)
    for kind in ("adam", "adagrad", "sgd")
    for table in _SHORT
    for state in ((None,) if kind == "sgd" else tuple(_SHORT))
}
SPARSE_UPDATE = {key: target for key, (target, _) in _UPDATES.items()}
_SYMBOLS = {
    BAG_FORWARD: "JaxbagBagFwdF32",
    ROWS_GRAD: "JaxbagRowsGradF32",
    UNIQUE_ROWS: "JaxbagUniqueRows",
    **dict(_UPDATES.values()),
}


def _source() -> str:
    """The kernel's C++ source (``cpu_kernel.cc``, package data beside this module)."""
    return importlib.resources.files(__name__.rpartition(".")[0]).joinpath("cpu_kernel.cc").read_text(encoding="utf-8")


_kernel_lock = threading.Lock()
_kernel_state: dict[str, object] = {}
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    env = os.environ.get("JAXBAG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # XDG: an empty or relative XDG_CACHE_HOME is ignored (a relative one would put the kernel
    # in whatever directory the process happens to run in)
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "jaxbag"


def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


_BUILD_RECIPE = 2  # part of the cache key: bump when the build command changes
_COMPILE_TIMEOUT_S = 180  # per attempt; a hung compiler must not block the first call for long
_STALE_BUILD_S = 3600  # build directories of killed builders older than this are removed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_ok(lib: Path) -> bool:
    """Whether ``lib`` is a complete build: its ``.sha256`` sidecar (written after the ``.so``
    was synced and renamed into place) matches. A truncated ``.so`` crashed ``dlopen`` with a
    bus error, and a damaged one was never rebuilt."""
    side = lib.with_name(lib.name + ".sha256")
    try:
        return lib.is_file() and side.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_BUILD_PREFIX = "jaxbag-build-"  # only directories with this prefix are ever removed


def _remove_stale_builds(out_dir: Path) -> None:
    """Build directories left by builders that were killed (``TemporaryDirectory`` cannot
    clean up after SIGKILL). Only jaxbag's own (``_BUILD_PREFIX``): the cache directory may be
    shared (``JAXBAG_CACHE_DIR=/tmp``), and other programs' ``tmp*`` folders are not ours."""
    now = time.time()
    for d in out_dir.glob(_BUILD_PREFIX + "*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _run_compiler(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in ``cwd`` in its own process group, killed as a whole on timeout (not only
    the driver: ``cc1plus`` would keep running)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=_COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _compiler_stamp(cxx: list[str]) -> str:
    """The compiler program's identity for a remembered failed build: its resolved path, size
    and modification time, so an updated or replaced compiler is tried again."""
    path = shutil.which(cxx[0]) or cxx[0]
    try:
        st = os.stat(path)
        return f"{os.path.realpath(path)} {st.st_size} {st.st_mtime_ns} {shlex.join(cxx)}"
    except OSError:
        return f"{path} ? ? {shlex.join(cxx)}"


def _library_name(source: str, cxx: list[str]) -> str:
    """The cached library's file name: a hash of everything the build depends on (the source,
    jax and jaxlib versions, the compiler command, the CPU, the build recipe)."""
    key = hashlib.sha256(
        f"{source}\0{jax.__version__}\0{jaxlib.version.__version__}\0{cxx}\0{_cpu_fingerprint()}"
        f"\0{_BUILD_RECIPE}".encode()
    ).hexdigest()[:16]
    return f"jaxbag_cpu_{key}.so"


def _build_kernel() -> Path:
    """Compiles the kernel into the cache (once per source / jaxlib / CPU) and returns the .so.

    A compiler that exits with an error is remembered (``<name>.so.failed`` beside the cache
    name, with the errors): later processes report it without compiling again, until the file
    is deleted or the compiler program changes."""
    cxx_env = os.environ.get("CXX", "").strip()
    cxx = shlex.split(cxx_env) if cxx_env else None  # e.g. CXX="ccache g++"
    if cxx is None:
        found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        cxx = [found] if found else None
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    source = _source()
    out_dir = _cache_dir()
    lib = out_dir / _library_name(source, cxx)
    if _cached_ok(lib):
        return lib
    failed, stamp = lib.with_name(lib.name + ".failed"), _compiler_stamp(cxx)
    try:
        first, _, earlier = failed.read_text().partition("\n")
    except OSError:
        first, earlier = None, ""
    if first == stamp:
        raise RuntimeError(
            f"an earlier build with the same compiler failed (remembered in {failed}: delete it "
            f"to try again):\n{earlier}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=_BUILD_PREFIX) as tmp:
        src = Path(tmp) / "bag.cc"
        src.write_text(source)
        tmp_lib = Path(tmp) / "bag.so"
        errors = []
        for arch in (["-march=native"], []):
            # relative file names: the build directory's name stays out of the binary, so
            # concurrent builders write identical bytes (and the sidecar matches either)
            cmd = [*cxx, "-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-w", "-I", include,
                   src.name, "-o", tmp_lib.name]
            try:
                proc = _run_compiler(cmd, cwd=tmp)
            except OSError as e:
                raise RuntimeError(f"the C++ compiler {cxx_env or cxx[0]!r} could not be run: {e}") from e
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(
                    f"the C++ compiler {cxx_env or cxx[0]!r} did not finish in {_COMPILE_TIMEOUT_S} s"
                ) from e
            if proc.returncode == 0:
                _fsync(tmp_lib)  # complete on disk before it gets its final name
                side = Path(tmp) / "bag.so.sha256"
                side.write_text(_sha256(tmp_lib))
                _fsync(side)
                os.replace(tmp_lib, lib)  # atomic: concurrent builders are fine
                os.replace(side, lib.with_name(lib.name + ".sha256"))
                return lib
            errors.append(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}: "
                          f"{proc.stderr[-2000:] or '(no output)'}")
        message = "compiling the jaxbag CPU kernel failed:\n" + "\n".join(errors)
        # Remembered, so later processes do not compile again (twice) only to fail again; not
        # a timeout or a compiler that could not be started: those may pass on the next try.
        note = Path(tmp) / "failed"
        note.write_text(f"{stamp}\n{message}")
        os.replace(note, failed)
        raise RuntimeError(message)


_DISABLE = ("1", "true", "yes", "on")  # JAXBAG_DISABLE_CPU_KERNEL values that switch it off
_KEEP = ("", "0", "false", "no", "off")  # ... and that leave it on


def _disabled_by_env() -> tuple[bool, str | None]:
    """Whether ``JAXBAG_DISABLE_CPU_KERNEL`` switches the kernel off: 1/true/yes/on (any case);
    unset, empty, 0/false/no/off leave it on. Another value switches it off (the cautious reading
    of a flag that was set), with a warning to give: ``(disabled, warning or None)``."""
    value = os.environ.get("JAXBAG_DISABLE_CPU_KERNEL", "").strip().lower()
    if value in _DISABLE or value in _KEEP:
        return value in _DISABLE, None
    return True, (
        f"JAXBAG_DISABLE_CPU_KERNEL={value!r} is not one of {_DISABLE + _KEEP[1:]}; taking it as "
        "set (the CPU kernel is off). Use JAXBAG_DISABLE_CPU_KERNEL=1 or 0."
    )


def _load_library(path: Path) -> ctypes.CDLL:
    """Loads the built kernel; a cached ``.so`` that does not load (its sidecar matched, yet it
    is damaged or built for another system) is removed and built once more."""
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        _log.info("the cached jaxbag CPU kernel %s does not load (%s): building it again", path, e)
        for stale in (path, path.with_name(path.name + ".sha256")):
            stale.unlink(missing_ok=True)
        return ctypes.cdll.LoadLibrary(str(_build_kernel()))


def _load_kernel() -> bool:
    with _kernel_lock:
        if "ok" in _kernel_state:
            return bool(_kernel_state["ok"])
        disabled, warning = _disabled_by_env()
        category = UserWarning
        if disabled:
            _kernel_state.update(ok=False, reason="disabled by JAXBAG_DISABLE_CPU_KERNEL")
        else:
            try:
                path = _build_kernel()
                lib = _load_library(path)
                for target, symbol in _SYMBOLS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                    )
                _kernel_state.update(ok=True, reason=f"loaded {path}", lib=lib)
            except Exception as e:  # noqa: BLE001  (any failure: fall back to the XLA formulation)
                _kernel_state.update(ok=False, reason=f"{type(e).__name__}: {e}")
                # Said once per process: the XLA path gives the same values, but a user who
                # expects the kernel's speed should learn why it is not there.
                warning, category = (
                    f"jaxbag's C++ CPU kernel is unavailable ({_kernel_state['reason']}); using "
                    "the XLA path (same values and gradients, slower on CPU). Set "
                    "JAXBAG_DISABLE_CPU_KERNEL=1 to use the XLA path without trying to build it.",
                    RuntimeWarning,
                )
    # Warned after the state is recorded: turned into an error, a warning raises once, and the
    # next call takes the XLA path.
    if warning:
        warnings.warn(warning, category, stacklevel=2)
    return bool(_kernel_state["ok"])


def cpu_kernel_status() -> tuple[bool, str]:
    """Whether jaxbag's C++ CPU kernel is available (building it on the first call), and why (not).

    Where it is, :func:`embedding_bag`, the modules and the sparse training path
    (:func:`embedding_bag_rows`, :func:`unique_rows`, the sparse optimisers) run it for float32
    tables on the CPU backend; elsewhere (other dtypes, GPU / TPU, inside ``shard_map``, or
    without the kernel) they run XLA ops with the same values and gradients.

    The kernel is compiled with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
    against the XLA FFI headers shipped in jaxlib, into ``$JAXBAG_CACHE_DIR`` (default
    ``$XDG_CACHE_HOME/jaxbag``, or ``~/.cache/jaxbag`` when that is unset, empty or relative).
    Set ``JAXBAG_DISABLE_CPU_KERNEL=1`` to never use it. Without it every call takes the
    pure-XLA path (same values and gradients).

    In a process whose default backend is not the CPU it returns ``(False, ...)`` without
    building anything: every call there takes the XLA path.

    Returns:
      ``(available, message)``.

    Examples:
      >>> from jaxbag import cpu_kernel_status
      >>> ok, why = cpu_kernel_status()
      >>> isinstance(ok, bool) and isinstance(why, str)
      True
    """
    backend = jax.default_backend()
    if backend != "cpu":
        return False, (f"JAX's default backend is {backend}: jaxbag runs XLA ops there (the C++ "
                       "kernel is for the CPU backend and is not built)")
    ok = _load_kernel()
    return ok, str(_kernel_state.get("reason", ""))


def in_shard_map(*arrays: Any) -> bool:
    """Whether any of ``arrays`` is traced inside ``shard_map`` (its mesh has Manual axes).

    The FFI calls do not carry the manual-axis typing, so ``platform_dependent`` could not pair
    them with the XLA branch there: inside ``shard_map`` the XLA path is used.
    """
    for a in arrays:
        if a is None or isinstance(a, jax.ShapeDtypeStruct):
            continue
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is not None and jax.sharding.AxisType.Manual in getattr(mesh, "axis_types", ()):
            return True
    return False


def kernel_ok(*arrays: Array | jax.ShapeDtypeStruct) -> bool:
    # (on a GPU/TPU process the kernel is never built: its calls would lower to the XLA path
    # there anyway, and building it cost seconds and wrote a .so to the cache)
    return (
        all(a.dtype == jnp.float32 for a in arrays)
        and not in_shard_map(*arrays)
        and jax.default_backend() == "cpu"
        and _load_kernel()
    )

