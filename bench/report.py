"""Reports from results: tables (rich on the console, Markdown in files) and PNG plots.

Every section of a results JSON (`parity`, `bench`, `bench_backward`, `overhead`, `sweep`) turns
into a list of `Table`s (title, headers, rows of text) by one function, so the console and the
Markdown files show the same numbers. Plots (matplotlib, Agg backend): the benchmark (forward,
and the training step of `bench --backward`) as bars of median time with min/max whiskers and the
floor as a line, one panel per case; the sweep as a heat map of fused_small's
speedup over the best baseline of each stack, each cell annotated with its floor; overheads as bars.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .env import describe

RESULTS_KIND = "fusedmlp-results"
RESULTS_VERSION = 1


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


# ---- formatting
# ------------------------------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _status(row: dict[str, Any], limit: int = 60) -> str:
    status = row["status"]
    if status in ("n/a", "skipped", "error") and row.get("message"):
        msg = row["message"].splitlines()[0]
        return f"{status} ({msg[:limit]}{'…' if len(msg) > limit else ''})"
    if status == "invalid measurement" and row.get("message"):
        return row["message"]  # says which time, the floor and the slack
    if row.get("flags"):
        return f"{status}; flagged: " + "; ".join(row["flags"])
    return status


def _provider(row: dict[str, Any]) -> str:
    """The provider, with the implementation `auto` chose."""
    name = row["provider"]
    chosen = row.get("chosen")
    if chosen and chosen != row.get("impl") and "→" not in name:
        name += f" → {chosen}"
    return name


def is_result(row: dict[str, Any]) -> bool:
    """A timed row whose numbers are results (not failed, not an invalid measurement)."""
    return row.get("status") == "timed" and bool(row.get("time"))


def _stat(row: dict[str, Any], key: str, what: str = "median") -> float | None:
    value = row.get(key)
    return value.get(what) if isinstance(value, dict) else None


# ---- tables per section
# -----------------------------------------------------------------------------
def parity_tables(parity: dict[str, Any]) -> list[Table]:
    tables = []
    for case in parity["cases"]:
        rows = []
        for r in case["rows"]:
            rows.append(
                [
                    _provider(r),
                    r.get("kernels", "-"),
                    "yes" if r.get("interpreted") else "no",
                    fmt_num(r.get("rel_fro"), ".2e"),
                    fmt_num(r.get("max_abs"), ".2e"),
                    fmt_num(r.get("bound_rel_fro"), ".1e"),
                    fmt_num(r.get("baseline_limit"), ".1e"),
                    _status(r),
                ]
            )
        subset = (
            f", {case['rows_checked']} of {case['m']} rows checked" if case["row_subset"] else ""
        )
        # Gradient parity (`parity --backward`): each row's measures are its worst gradient's.
        what = "Gradient parity (worst of dx, dW, db per row)" if case.get("backward") else "Parity"
        tables.append(
            Table(
                f"{what}: {case['spec_text']}, M={case['m']} on {case['device']}{subset}",
                [
                    "provider",
                    "kernels",
                    "interp.",
                    "rel_fro",
                    "max_abs",
                    "tol rel_fro",
                    "2x baseline",
                    "status",
                ],
                rows,
            )
        )
        if case["cross"]:
            tables.append(
                Table(
                    "Twins on the same inputs "
                    "(difference scaled by the reference; tol = 2x policy)",
                    ["pair", "rel_fro", "max_abs", "tol rel_fro", "identical bits", "status"],
                    [
                        [
                            x["pair"],
                            fmt_num(x["rel_fro"], ".2e"),
                            fmt_num(x["max_abs"], ".2e"),
                            fmt_num(x["bound_rel_fro"], ".1e"),
                            "yes" if x["identical"] else "no",
                            x["status"],
                        ]
                        for x in case["cross"]
                    ],
                )
            )
    return tables


def same_code_rows(case: dict[str, Any]) -> list[str]:
    """Rows that time one code path twice in a case — a provider whose choice is another row's
    implementation of the same stack (`jax:auto → xla` beside `jax:xla`): their gap is the run's
    row-to-row noise, free in every bench that times `auto`. Each as 'a / b: ±x %'."""
    timed = [r for r in case["rows"] if is_result(r)]
    notes = []
    for row in timed:
        chosen = row.get("chosen")
        if not chosen or chosen == row.get("impl"):
            continue
        for twin in timed:
            if (
                twin is not row
                and twin.get("stack") == row.get("stack")
                and twin.get("impl") == chosen
            ):
                a, b = row["time"]["median"], twin["time"]["median"]
                notes.append(
                    f"{_provider(row)} {fmt_time(a)} / {twin['provider']} {fmt_time(b)}: "
                    f"{(a / b - 1) * 100:+.1f} %"
                )
    return notes


def bench_tables(bench: dict[str, Any]) -> list[Table]:
    c = bench["ceilings"]
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in c["matmul"].items())
    read = c.get("read")
    tables = [
        Table(
            "Ceilings (measured in this run)",
            ["matmul", "copy (read + write)", "read only"],
            [[mm, f"{c['copy'] / 1e9:.4g} GB/s", f"{read / 1e9:.4g} GB/s" if read else "-"]],
        )
    ]
    for case in bench["cases"]:
        fl = case["floor"]
        gpu = case["device"] == "cuda"
        rows = []
        for r in case["rows"]:
            t = r.get("time") if is_result(r) else None
            graph = r.get("cudagraph")
            rows.append(
                [
                    _provider(r) + (" (baseline)" if r.get("baseline") else ""),
                    r.get("kernels", "-"),
                    fmt_time(t["median"]) if t else "-",
                    f"{fmt_time(t['min'])} … {fmt_time(t['max'])}" if t else "-",
                    str(t["n"]) if t else "-",
                    fmt_time(_stat(r, "span")) if t else "-",
                    str(r["kernels_per_call"]) if t and r.get("kernels_per_call") else "-",
                    fmt_time(_stat(r, "throughput")),
                    fmt_time(_stat(r, "host_issue") or r.get("host_dispatch_s")),
                    fmt_time(graph["median"])
                    if graph
                    else ("n/a" if r.get("cudagraph_note") else "-"),
                    fmt_num(r.get("tflops"), ".3g"),
                    fmt_num(r.get("gbps"), ".4g"),
                    fmt_num(r.get("pct_roofline"), ".1f"),
                    _status(r),
                ]
            )
        methods = sorted({r["time"]["method"] for r in case["rows"] if is_result(r)})
        notes = sorted(
            {
                f"{_provider(r)}: {r['cudagraph_note']}"
                for r in case["rows"]
                if r.get("cudagraph_note")
            }
        )
        twice = same_code_rows(case)
        tables.append(
            Table(
                f"Bench: {case.get('preset', '')} {case['spec_text']}, M={case['m']} "
                f"on {case['device']}",
                [
                    "provider",
                    "kernels",
                    "device" if gpu else "host sync",
                    "min … max",
                    "n",
                    "span",
                    "K",
                    "throughput",
                    "host issue",
                    "cudagraph",
                    "TFLOP/s",
                    "GB/s",
                    "% roofline",
                    "status",
                ],
                rows,
                caption=(
                    f"floor {fmt_time(fl['per_layer_s'])} per-layer / {fmt_time(fl['whole_s'])} "
                    f"whole-MLP ({fl['bound']}-bound); {case.get('input_sets', 1)} input set(s) "
                    "rotated. "
                    + (
                        "device = sum of the call's kernel durations (K per call), span = first "
                        "kernel start to last end, each call after an L2 flush; throughput = N "
                        "calls back to back + one wait, per call; cudagraph = "
                        "one CUDA graph of the calls, replayed (flagged beyond 5 %)"
                        if gpu
                        else "No device on a CPU: the time is the host clock around each "
                        "synchronised call"
                    )
                    + "; timed with "
                    + ("; ".join(methods) or "-")
                    + ("" if not notes else "; " + "; ".join(notes))
                    + (
                        ""
                        if not twice
                        else "; the same kernels timed twice (row-to-row noise): "
                        + "; ".join(twice)
                    )
                ),
            )
        )
    paired = paired_table(bench["cases"])
    return tables + ([paired] if paired else [])


def paired_table(cases: list[dict[str, Any]]) -> Table | None:
    """`bench --paired`: each stack's `auto` against its baselines, the ratio taken inside each
    interleaved round (bench/paired.py); None where no case was paired."""
    rows = []
    for case in cases:
        for pair in case.get("paired", []):
            label = f"{case.get('preset', '')} M={case['m']}"
            if "ratio" not in pair:  # {"error": ...} or {"skipped": ...} (benchmark.pair_rows)
                why = pair.get("error") or f"skipped: {pair.get('skipped')}"
                rows.append([label, pair["stack"], "-", "-", "-", "-", "-", "-", why])
                continue
            ours = pair["time"][pair["ours"]]["median"]
            for base, ratio in pair["ratio"].items():
                if base in pair["time"]:
                    theirs = pair["time"][base]["median"]
                else:  # 06f19d6's files have no "best" time: the smallest baseline median
                    theirs = min(pair["time"][b]["median"] for b in pair["baselines"])
                rows.append(
                    [
                        label,
                        f"{pair['ours']} → {pair['chosen']}",
                        base,
                        fmt_time(ours),
                        fmt_time(theirs),
                        f"{ratio['median']:.3f}×",
                        # (06f19d6's files predate the interval)
                        "{:.3f} … {:.3f}".format(*ratio["ci95"]) if "ci95" in ratio else "-",
                        f"{ratio['min']:.3f} … {ratio['max']:.3f}",
                        f"{pair['rounds']} × {pair['calls']}",
                    ]
                )
    if not rows:
        return None
    return Table(
        "Paired rounds: auto against its stack's baselines",
        [
            "case",
            "ours",
            "baseline",
            "ours (median)",
            "baseline (median)",
            "×",
            "95 % interval",
            "range",
            "rounds × calls",
        ],
        rows,
        caption="× = baseline ÷ ours inside each round (above 1: ours is faster): its median over "
        "the rounds, the median's distribution-free 95 % interval and the range; a round times "
        "every contender twice, `calls` calls each time, in a palindrome (A B C C B A, its start "
        "rotated round by round), so drift between rounds and linear drift inside one cancel "
        "(bench/paired.py), after an unrecorded warm round; best = each round's fastest baseline; "
        "times are the medians over the rounds (best's: of each round's fastest)",
    )


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def bench_backward_tables(bench: dict[str, Any]) -> list[Table]:
    """`bench --backward`: one training step per row, with its peak memory and its speed against
    the best baseline of its stack."""
    c = bench["ceilings"]
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in c["matmul"].items())
    read = c.get("read")
    tables = [
        Table(
            "Ceilings (measured in this run)",
            ["matmul", "copy (read + write)", "read only"],
            [[mm, f"{c['copy'] / 1e9:.4g} GB/s", f"{read / 1e9:.4g} GB/s" if read else "-"]],
        )
    ]
    for case in bench["cases"]:
        fl = case["floor"]
        gpu = case["device"] == "cuda"
        rows = []
        for r in case["rows"]:
            t = r.get("time") if is_result(r) else None
            rows.append(
                [
                    _provider(r) + (" (baseline)" if r.get("baseline") else ""),
                    r.get("kernels", "-"),
                    r.get("saved", "-"),
                    fmt_time(t["median"]) if t else "-",
                    f"{fmt_time(t['min'])} … {fmt_time(t['max'])}" if t else "-",
                    str(t["n"]) if t else "-",
                    fmt_time(_stat(r, "span")) if t else "-",
                    str(r["kernels_per_call"]) if t and r.get("kernels_per_call") else "-",
                    fmt_time(_stat(r, "throughput")),
                    fmt_time(_stat(r, "host_issue")),
                    fmt_num(r.get("tflops"), ".3g"),
                    fmt_num(r.get("gbps"), ".4g"),
                    fmt_num(r.get("pct_roofline"), ".1f"),
                    f"{r['vs_best_baseline']:.2f}x" if r.get("vs_best_baseline") else "-",
                    fmt_bytes(r.get("peak_bytes")),
                    r.get("parity", "-"),
                    _status(r),
                ]
            )
        methods = sorted({r["time"]["method"] for r in case["rows"] if is_result(r)})
        memory = sorted(
            {f"{r['stack']}: {r['memory_method']}" for r in case["rows"] if r.get("peak_bytes")}
        )
        tables.append(
            Table(
                f"Bench --backward (forward + backward): {case.get('preset', '')} "
                f"{case['spec_text']}, M={case['m']} on {case['device']}, "
                f"saved={case['saved']}",
                [
                    "provider",
                    "kernels",
                    "saved",
                    "device" if gpu else "host sync",
                    "min … max",
                    "n",
                    "span",
                    "K",
                    "throughput",
                    "host issue",
                    "TFLOP/s",
                    "GB/s",
                    "% floor",
                    "vs best baseline",
                    "peak memory",
                    "parity",
                    "status",
                ],
                rows,
                caption=(
                    f"one step = forward + backward of loss Σ y·dy (dx and every param's "
                    f"gradient); floor {fmt_time(fl['preact_s'])} (preact, the baselines') / "
                    f"{fmt_time(fl['inputs_s'])} (inputs: the forward again), {fl['bound']}-bound "
                    f"({fl['flops_preact'] / 1e9:.4g} GFLOP, {fl['bytes_preact'] / 2**20:.4g} MiB "
                    f"at least); gradients gated by {case.get('gate', '-')}; "
                    f"{case.get('input_sets', 1)} input set(s) rotated. "
                    + (
                        "device = sum of the step's kernel durations (K per step), each step "
                        "after an L2 flush; throughput = N steps back to back + one wait"
                        if gpu
                        else "No device on a CPU: the time is the host clock around each "
                        "synchronised step, not device time"
                    )
                    + "; vs best baseline = the stack's best baseline time / the row's; peak "
                    "memory = the step's peak above its resident inputs ("
                    + ("; ".join(memory) or "-")
                    + "); timed with "
                    + ("; ".join(methods) or "-")
                ),
            )
        )
    return tables


def overhead_tables(overhead: dict[str, Any]) -> list[Table]:
    rows = []
    for r in overhead["rows"]:
        rows.append(
            [
                r["provider"],
                fmt_time(r.get("first_call_s")),
                fmt_time(r.get("host_async_s")),
                fmt_time(r.get("host_sync_s")),
                fmt_time(r.get("throughput_s")),
                fmt_time(r.get("device_s")),
                str(r["kernels_per_call"]) if r.get("kernels_per_call") else "-",
                fmt_time(r.get("overhead_s")),
                r.get("what", ""),
                _status(r),
            ]
        )
    out = [
        Table(
            f"Overhead: {overhead['spec_text']}, M={overhead['m']} on {overhead['device']}",
            [
                "path",
                "first call",
                "host issue",
                "host sync",
                "throughput",
                "device",
                "K",
                "sync - device",
                "first call is",
                "status",
            ],
            rows,
            caption=overhead.get("note", ""),
        )
    ]
    return out + decomposition_tables(overhead.get("decomposition"))


def decomposition_tables(decomposition: dict[str, Any] | None) -> list[Table]:
    """The same kernel from both frameworks (bench/cross_overhead.py) and the framework's share."""
    if not decomposition:
        return []
    if not decomposition.get("rows"):
        reason = decomposition.get("reason") or "no rows"
        return [
            Table(
                "Overhead decomposition (same kernel, both frameworks)",
                ["status"],
                [[f"not measured: {reason}"]],
            )
        ]
    rows = [
        [
            r["kernel"],
            r["framework"],
            fmt_num(r.get("device_us"), ".1f"),
            str(r.get("kernels_per_call") or "-"),
            fmt_num(r.get("span_us"), ".1f"),
            fmt_num(r.get("throughput_us"), ".1f"),
            fmt_num(r.get("host_issue_us"), ".1f"),
            fmt_num(r.get("host_sync_us"), ".1f"),
            fmt_num(r.get("first_call_ms"), ".1f"),
            str(r.get("same_bits")),
            r.get("note") or "",
        ]
        for r in decomposition["rows"]
    ]
    deltas = [
        [
            d["kernel"],
            f"{d['cross']} - {d['native']}",
            fmt_num(d.get("device_us_delta"), "+.1f"),
            "-" if d.get("kernels_delta") is None else f"{d['kernels_delta']:+d}",
            fmt_num(d.get("throughput_us_delta"), "+.1f"),
            fmt_num(d.get("host_issue_us_delta"), "+.1f"),
            fmt_num(d.get("host_sync_us_delta"), "+.1f"),
            fmt_num(d.get("first_call_ms_delta"), "+.1f"),
        ]
        for d in decomposition.get("attribution", [])
    ]
    return [
        Table(
            "Overhead decomposition: the same compiled kernel from each framework",
            [
                "kernel",
                "framework",
                "device µs",
                "K",
                "span µs",
                "throughput µs",
                "host issue µs",
                "host sync µs",
                "first call ms",
                "same bits as native",
                "note",
            ],
            rows,
        ),
        Table(
            "Attributed to the framework (cross call minus native call)",
            [
                "kernel",
                "frameworks",
                "device µs",
                "K",
                "throughput µs",
                "host issue µs",
                "host sync µs",
                "first call ms",
            ],
            deltas,
            caption="device and K differ only where one route runs extra device work (a pad, a "
            "copy); the host columns are the framework's call path",
        ),
    ]


def sweep_tables(sweep: dict[str, Any]) -> list[Table]:
    rows = []
    for cell in sweep["cells"]:
        rows.append(
            [
                str(cell["width"]),
                str(cell["depth"]),
                fmt_time(cell["floor_s"]),
                *(fmt_time(cell["times"].get(p)) for p in sweep["providers"]),
                *(fmt_num(cell["speedup"].get(s), ".2f") for s in ("torch", "jax")),
                cell.get("note", ""),
            ]
        )
    return [
        Table(
            f"Narrow sweep: {sweep['activation']}, {sweep['dtype']}, M={sweep['m']} on "
            f"{sweep['device']}",
            [
                "width",
                "depth",
                "floor",
                *sweep["providers"],
                "speedup torch",
                "speedup jax",
                "note",
            ],
            rows,
            caption="speedup = best baseline of the stack / fused_small of the stack (n/a where "
            "fused_small is interpreted, unsupported or failed parity)",
        )
    ]


def train_tables(train: dict[str, Any]) -> list[Table]:
    from .train import train_tables as tables_of_train  # `fusedmlp train` runs (bench/train.py)

    return tables_of_train(train)


SECTIONS = {
    "parity": parity_tables,
    "bench": bench_tables,
    "bench_backward": bench_backward_tables,
    "overhead": overhead_tables,
    "sweep": sweep_tables,
    "train": train_tables,
}


def tables(results: dict[str, Any]) -> list[Table]:
    out = []
    for name, fn in SECTIONS.items():
        if name in results:
            out += fn(results[name])
    return out


# ---- renderers
# ------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(results: dict[str, Any]) -> str:
    lines = ["# fusedmlp results", ""]
    if "environment" in results:
        lines += [f"Machine: {describe(results['environment'])}", ""]
    for t in tables(results):
        lines += [
            f"## {t.title}",
            "",
            "| " + " | ".join(t.headers) + " |",
            "|" + "---|" * len(t.headers),
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        if t.caption:
            lines += ["", t.caption]
        lines.append("")
    if "parity" in results:
        p = results["parity"]
        lines.append("Parity: " + ("PASS" if p["passed"] else "FAIL: " + "; ".join(p["failures"])))
    return "\n".join(lines) + "\n"


def print_tables(console: Any, items: list[Table]) -> None:
    from rich.table import Table as RichTable

    for t in items:
        table = RichTable(title=t.title, caption=t.caption or None, title_justify="left")
        for i, h in enumerate(t.headers):
            table.add_column(h, overflow="fold", no_wrap=i == 0)
        for row in t.rows:
            styled = []
            for cell in row:
                if cell.startswith(("FAIL", "error")):
                    cell = f"[bold red]{cell}[/]"
                elif cell == "pass" or cell == "timed":
                    cell = f"[green]{cell}[/]"
                styled.append(cell)
            table.add_row(*styled)
        console.print(table)


# ---- plots
# ----------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_chart(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Write a chart as a palette PNG and close it.

    Why: a bar or line chart holds a few hundred colours (its anti-aliased edges); its 256
    nearest, undithered, leave every pixel within ~30/255 of matplotlib's RGBA file and no change
    to the eye, at a quarter of the bytes (the runner's bench.png: 820 → 216 KB). bench/results/
    is committed and travels to the GPU machine with the working tree, whose limit is 64 MiB.
    Photographs (train.py's image-compare.png) are saved as they are."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    _plt().close(fig)
    buf.seek(0)
    with Image.open(buf) as image:
        palette = image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        palette.save(path, format="PNG", optimize=True)
    return path


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return save_chart(fig, path)


def plot_bench(bench: dict[str, Any], path: Path) -> Path:
    """Bars per case; a `bench --backward` result (its floors per policy) draws its steps."""
    plt = _plt()
    import textwrap

    cases = bench["cases"]
    heights = [1.6 + 0.3 * max(1, sum(1 for r in c["rows"] if is_result(r))) for c in cases]
    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(9, sum(heights) + 0.3),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        timed = [r for r in case["rows"] if is_result(r)]
        names = [_provider(r) for r in timed]
        med = [r["time"]["median"] * 1e3 for r in timed]
        lo = [m - r["time"]["min"] * 1e3 for m, r in zip(med, timed, strict=True)]
        hi = [r["time"]["max"] * 1e3 - m for m, r in zip(med, timed, strict=True)]
        colors = [
            "#888888" if r.get("baseline") else ("#1f77b4" if r["stack"] == "torch" else "#d62728")
            for r in timed
        ]
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
        lines = (
            (("preact_s", "--", "floor, saved=preact"), ("inputs_s", ":", "floor, saved=inputs"))
            if "preact_s" in case["floor"]
            else (("per_layer_s", "--", "floor, per-layer"), ("whole_s", ":", "floor, whole MLP"))
        )
        for key, style, label in lines:
            ax.axvline(case["floor"][key] * 1e3, color="k", ls=style, lw=1, label=label)
        untimed = [r["provider"] for r in case["rows"] if not is_result(r)]
        title = f"{case.get('preset', '')} M={case['m']} ({case['spec_text']})"
        if untimed:
            title += "\n" + textwrap.fill(f"not timed: {', '.join(untimed)}", 120)
        ax.set_title(title, fontsize=8)
        ax.set_xscale("log")
        what = "step (forward + backward)" if "preact_s" in case["floor"] else "call"
        ax.set_xlabel(f"median time per {what}, ms, log scale (whiskers: min/max)")
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    import numpy as np

    plt = _plt()
    widths, depths = sweep["widths"], sweep["depths"]
    stacks = ("torch", "jax")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, stack in zip(axes, stacks, strict=True):
        grid = np.full((len(depths), len(widths)), np.nan)
        notes = {}
        for cell in sweep["cells"]:
            i, j = depths.index(cell["depth"]), widths.index(cell["width"])
            s = cell["speedup"].get(stack)
            if s is not None:
                grid[i, j] = s
            notes[(i, j)] = cell["floor_s"]
        finite = grid[np.isfinite(grid)]
        span = max(2.0, float(np.max(np.abs(np.log2(finite))))) if finite.size else 2.0
        im = ax.imshow(
            np.log2(grid), cmap="RdYlGn", vmin=-span, vmax=span, origin="lower", aspect="auto"
        )
        for (i, j), fl in notes.items():
            val = "n/a" if not np.isfinite(grid[i, j]) else f"{grid[i, j]:.2f}x"
            ax.text(j, i, f"{val}\nfloor {fmt_time(fl)}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(widths)), [str(w) for w in widths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("width")
        ax.set_ylabel("depth (layers)")
        ax.set_title(f"{stack}: fused_small speedup over best baseline", fontsize=9)
        fig.colorbar(im, ax=ax, label="log2 speedup")
    fig.suptitle(
        f"{sweep['activation']}, {sweep['dtype']}, M={sweep['m']}, {sweep['device']}", fontsize=9
    )
    return _save(fig, path)


def plot_overhead(overhead: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = [r for r in overhead["rows"] if r.get("host_sync_s") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.8 + 0.4 * max(3, len(rows))))
    names = [r["provider"] for r in rows]
    series = [
        ("host_async_s", "host issue"),
        ("host_sync_s", "host sync"),
        ("throughput_s", "throughput"),
        ("device_s", "device"),
    ]
    height = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        vals = [(r.get(key) or 0) * 1e6 for r in rows]
        axes[0].barh([i + k * height for i in range(len(rows))], vals, height=height, label=label)
    axes[0].set_yticks([i + height for i in range(len(rows))], names, fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("µs per call, log scale")
    axes[0].legend(fontsize=7, loc="best", framealpha=0.6)
    firsts = [r for r in overhead["rows"] if r.get("first_call_s") is not None]
    axes[1].barh([r["provider"] for r in firsts], [r["first_call_s"] for r in firsts])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("first call, s (trace + compile)")
    axes[1].tick_params(labelsize=7)
    fig.suptitle(
        f"Overhead: {overhead['spec_text']}, M={overhead['m']}, {overhead['device']}", fontsize=9
    )
    return _save(fig, path)


def plot_train(train: dict[str, Any], path: Path) -> Path:
    from .train import plot_train as plot_of_train

    return plot_of_train(train, path)


PLOTS = {
    "bench": plot_bench,
    "bench_backward": plot_bench,
    "sweep": plot_sweep,
    "overhead": plot_overhead,
    "train": plot_train,
}


def plot_all(results: dict[str, Any], out_dir: Path, stem: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        fn(results[name], out_dir / f"{stem}{name}.png")
        for name, fn in PLOTS.items()
        if name in results
    ]


# ---- files
# ----------------------------------------------------------------------------------------
def write_json(results: dict[str, Any], path: Path) -> None:
    """Atomically (a temporary file, then a rename): a run killed by its time limit mid-write
    leaves the previous checkpoint, which the runner's report and derive steps still read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("kind") != RESULTS_KIND:
        raise ValueError(
            f"{path}: expected a fusedmlp results file (kind {RESULTS_KIND!r}), "
            f"got kind {data.get('kind')!r}"
        )
    return data


def merge(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One results object from several (later sections win; the first environment is kept)."""
    out: dict[str, Any] = {"kind": RESULTS_KIND, "version": RESULTS_VERSION}
    for data in items:
        for key, value in data.items():
            if key == "environment" and "environment" in out:
                continue
            out[key] = value
    return out
