"""The benchmark's outputs: a text table with ratios, ``results.json`` and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASE_TITLE = {"fwd": "forward", "fwd_bwd": "forward+backward", "train": "train step (Adam)"}


def _fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-".rjust(width)
    return format(x, spec)


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def format_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One block per (shape, phase, mode): every implementation's median and its ratios to torch."""
    lines = [
        (
            f"backend={meta['backend']} jax={meta['jax']} torch={meta['torch']} "
            f"({meta.get('torch_device') or '-'}) "
            f"threads: xla={meta['threads']} torch={meta['torch_threads']}  "
            f"memcpy={meta['memcpy_gbps']:.1f} GB/s  load avg (1 min) at start/end: "
            f"{meta['loadavg_start'][0]:.1f}/{meta.get('loadavg_end', [float('nan')])[0]:.1f}"
        ),
        (
            "ratio = time / torch time (x torch: dense torch; in train steps the fastest of torch's "
            "Adam implementations, torch=<it>; x sparse: torch sparse=True). "
            "GB/s = gathered row bytes (N*D*4) / time (forward only); %cpy = that / memcpy GB/s."
        ),
    ]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["shape"], r["phase"], r["mode"])].append(r)
    header = (
        f"  {'impl':<14}{'median ms':>11}{'p10':>9}{'p90':>9}{'x torch':>9}{'x sparse':>9}"
        f"{'GB/s':>7}{'%cpy':>6}{'compile s':>10}{'temp MB':>9}{'max err':>9}"
    )
    for (shape, phase, mode), rows in groups.items():
        r0 = rows[0]
        lines.append("")
        lines.append(
            f"[{shape}] V={r0['V']} D={r0['D']} B={r0['B']} N={r0['N']} L_max={r0['L_max']}  "
            f"{PHASE_TITLE.get(phase, phase)}  mode={mode}"
        )
        lines.append(header)
        for r in rows:
            if r.get("skipped"):
                lines.append(f"  {r['impl']:<14}  skipped: {r['skipped']}")
                continue
            name = r["impl"] + (f"={r['variant'].removeprefix('torch_')}" if r.get("variant") else "")
            lines.append(
                f"  {name:<14}{_fmt(r['median_ms'], '11.3f')}{_fmt(r['p10_ms'], '9.3f')}"
                f"{_fmt(r['p90_ms'], '9.3f')}{_fmt(r.get('x_torch'), '9.2f')}"
                f"{_fmt(r.get('x_torch_sparse'), '9.2f')}{_fmt(r.get('gbps'), '7.1f')}"
                f"{_fmt(None if r.get('gbps') is None else 100 * r['gbps'] / meta['memcpy_gbps'], '6.0f')}"
                f"{_fmt(r.get('compile_s'), '10.2f')}{_mb(r.get('temp_bytes')):>9}"
                f"{_fmt(r.get('max_abs_err'), '9.1e')}{'!' if r.get('check_failed') else ''}"
            )
    failed = [r for r in results if r.get("check_failed")]
    if failed:
        lines.append("")
        lines.append(f"! {len(failed)} result(s) failed their check (max err above the tolerance): "
                     "their times are of a wrong computation.")
    return "\n".join(lines)


def _plain(x: Any) -> Any:
    """JSON-able copy: ConfigDicts -> dicts, tuples -> lists, numpy scalars -> Python."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def write_json(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(_plain({"meta": meta, "results": results}), indent=1))


def plot(workdir: Path, results: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> list[str]:
    """Bar charts of the reference shapes and line plots of the sweeps (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ref = [r for r in results if r.get("sweep") is None and not r.get("skipped")]
    shapes = list(dict.fromkeys(r["shape"] for r in ref))
    phases = list(dict.fromkeys(r["phase"] for r in ref))
    if shapes and phases:
        fig, axes = plt.subplots(
            len(phases), len(shapes), figsize=(4.5 * len(shapes), 3.2 * len(phases)), squeeze=False
        )
        for i, phase in enumerate(phases):
            for j, shape in enumerate(shapes):
                ax = axes[i][j]
                rows = [r for r in ref if r["phase"] == phase and r["shape"] == shape]
                modes = list(dict.fromkeys(r["mode"] for r in rows))
                impls = list(dict.fromkeys(r["impl"] for r in rows))
                width = 0.8 / max(len(modes), 1)
                for k, mode in enumerate(modes):
                    vals = []
                    for impl in impls:
                        hit = [r["median_ms"] for r in rows if r["impl"] == impl and r["mode"] == mode]
                        vals.append(hit[0] if hit else float("nan"))
                    ax.bar([x + k * width for x in range(len(impls))], vals, width, label=mode)
                ax.set_xticks([x + 0.4 - width / 2 for x in range(len(impls))])
                ax.set_xticklabels(impls, rotation=45, ha="right", fontsize=7)
                ax.set_yscale("log")
                ax.set_ylabel("ms (median)")
                ax.set_title(f"{shape}: {PHASE_TITLE.get(phase, phase)}", fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        out = workdir / "reference.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out.name)

    for sweep in sweeps:
        name = sweep["name"]
        rows = [r for r in results if r.get("sweep") == name and not r.get("skipped")]
        if not rows:
            continue
        phases = list(dict.fromkeys(r["phase"] for r in rows))
        fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.6), squeeze=False)
        for i, phase in enumerate(phases):
            ax = axes[0][i]
            sel = [r for r in rows if r["phase"] == phase]
            for impl in dict.fromkeys(r["impl"] for r in sel):
                pts = sorted((r[sweep["param"]], r["median_ms"]) for r in sel if r["impl"] == impl)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(sweep["param"])
            ax.set_ylabel("ms (median)")
            ax.set_title(f"sweep {name}: {PHASE_TITLE.get(phase, phase)} mode={sel[0]['mode']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = workdir / f"sweep_{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out.name)
    return written
