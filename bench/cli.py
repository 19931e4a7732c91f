"""`fusedmlp`: the command line of the harness.

    fusedmlp                      the main job: CPU -> parity matrix of cpu-small through every
                                  implementation that runs here; GPU -> parity + bench of the
                                  default presets
    fusedmlp parity   [--preset NAME | --spec FILE] [--m LIST] [--impl LIST] [--dtype LIST]
                      [--fp32-precision ieee,tf32] [--backward] [--device cpu|cuda] [--json PATH]
                      [--markdown PATH]
    fusedmlp bench    [--preset ...] [--m 16,8192] [--impl LIST] [--device ...] [--json PATH]
                      [--markdown PATH] [--plot PATH] [--backward [--saved preact|inputs]]
    fusedmlp overhead [--device ...] [--impl LIST] [--json PATH] [--markdown PATH] [--plot PATH]
    fusedmlp sweep    [--short] [--widths 16,32] [--depths 2,4] [--m M] [--json ...] [--plot ...]
    fusedmlp report   RESULTS.json [MORE.json ...] [--markdown PATH] [--plot-dir DIR] [--json PATH]
    fusedmlp compress [--ranks 16,64] [--sentences N] [--json PATH] [--markdown PATH] [--plot PATH]
    fusedmlp train    image|lm [--stack torch,jax] [--impl auto,baseline] [--precision bf16,fp16]
                      [--steps N] [--seed N] [--device cpu|cuda] [--out DIR]   (bench/train.py)

Exit status: 0 on success, 1 when any parity check fails (parity, and bench's parity gate, which
flags failing paths instead of timing them) or a timed row is an error or an invalid measurement
(below its roofline floor: bench, sweep), 2 on a usage error. Nothing here imports torch or jax
until a command needs them, so `fusedmlp --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusedmlp.common import MLPSpec
from fusedmlp.common.config import DEFAULT_SAVED, SAVED_POLICIES
from fusedmlp.common.presets import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESETS, PRESETS, get_preset

from . import paired
from . import report as rep


def _console() -> Any:
    from rich.console import Console

    # Wide enough for the bench table when the output is a log file, not a terminal ($COLUMNS wins).
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if wide else 200, highlight=False)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ---- what to run --------------------------------------------------------------------------------
def resolve_device(name: str | None, cpu_threads: int | None = None) -> str:
    """The device to run on; on a CPU, also the frameworks' thread count (see `_cpu_threads`)."""
    from .cases import default_device

    if name is None:
        name = default_device()
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"fusedmlp: --device: expected 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and default_device() != "cuda":
        raise SystemExit("fusedmlp: --device cuda: no CUDA GPU on this machine")
    if name == "cpu":
        _cpu_threads(DEFAULT_CPU_THREADS if cpu_threads is None else cpu_threads)
    return name


# On a CPU shared with other work, torch's OpenMP threads spin-wait on each other: cpu-small's
# eager MLP took a 48 ms median with 2 threads on a loaded 2-core machine and 0.40 ms with 1
# (2026-11-23). One thread per framework makes CPU timings stable; --cpu-threads 0 keeps defaults.
DEFAULT_CPU_THREADS = 1
CPU_THREADS: dict[str, int] = {}


def _cpu_threads(n: int) -> None:
    if n <= 0:
        return
    import torch

    torch.set_num_threads(n)
    CPU_THREADS["torch"] = n
    if "jax" not in sys.modules and n == 1:
        # XLA reads its flags when the backend starts: only effective before JAX is first used.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
        CPU_THREADS["xla"] = 1


def resolve_items(args: argparse.Namespace, device: str) -> list[tuple[str, MLPSpec, int]]:
    """(label, spec, M) for every case named by --preset/--spec, --m and --dtype."""
    try:
        return _items(args, device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fusedmlp: {exc}") from None


def _items(args: argparse.Namespace, device: str) -> list[tuple[str, MLPSpec, int]]:
    base: list[tuple[str, MLPSpec, tuple[int, ...]]] = []
    if getattr(args, "spec", None):
        for path in args.spec:
            spec = MLPSpec.from_json(Path(path))
            base.append((Path(path).stem, spec, (64,)))
    presets = args.preset or (
        [] if base else [DEFAULT_CPU_PRESET] if device == "cpu" else list(DEFAULT_GPU_PRESETS)
    )
    for name in presets:
        for one in _names(name):
            p = get_preset(one)
            base.append((p.name, p.spec, p.batch_sizes))
    precisions = getattr(args, "fp32_precision", None)
    items = []
    for label, spec, sizes in base:
        specs = [
            spec.replace(dtype=d, fp32_precision="ieee") if d != spec.dtype else spec
            for d in (args.dtype or (spec.dtype,))
        ]
        if precisions:  # each float32 spec once per precision; 16-bit ones have none to set
            specs = [
                s.replace(fp32_precision=p) if s.dtype == "float32" else s
                for s in specs
                for p in (precisions if s.dtype == "float32" else precisions[:1])
            ]
        for s in specs:
            for m in args.m or sizes:
                items.append((label, s, m))
    return items


def _providers(args: argparse.Namespace) -> list[Any]:
    from .providers import FAULTS, TUNING, select

    FAULTS.clear()
    FAULTS.update(getattr(args, "inject_fault", None) or ())
    TUNING["torch"] = bool(getattr(args, "tune", False))
    try:
        return select(args.impl)
    except ValueError as exc:
        raise SystemExit(f"fusedmlp: {exc}") from None


def _device(args: argparse.Namespace) -> str:
    return resolve_device(args.device, getattr(args, "cpu_threads", None))


def _device_providers_items(
    args: argparse.Namespace,
) -> tuple[str, list[Any], list[tuple[str, MLPSpec, int]]]:
    """What `parity` and `bench` run: the device, the providers, the (label, spec, M) items."""
    device = _device(args)
    return device, _providers(args), resolve_items(args, device)


_ENV: dict[str, Any] = {}


def _results(section: str, payload: dict[str, Any]) -> dict[str, Any]:
    from .env import environment

    if not _ENV:  # read once per process: checkpoints would otherwise call nvidia-smi each time
        _ENV.update(environment())
        _ENV["cpu_threads"] = dict(CPU_THREADS)
    return {
        "kind": rep.RESULTS_KIND,
        "version": rep.RESULTS_VERSION,
        "environment": dict(_ENV),
        section: payload,
    }


def _checkpoint(args: argparse.Namespace, section: str) -> Any:
    """Save partial results to --json after each case, so a runner's time limit keeps them."""
    if not getattr(args, "json", None):
        return None
    return lambda partial: rep.write_json(_results(section, partial), Path(args.json))


def _write(args: argparse.Namespace, results: dict[str, Any], console: Any) -> None:
    if getattr(args, "json", None):
        rep.write_json(results, Path(args.json))
        console.print(f"wrote {args.json}")
    if getattr(args, "markdown", None):
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(rep.to_markdown(results))
        console.print(f"wrote {args.markdown}")
    if getattr(args, "plot", None):
        for name, fn in rep.PLOTS.items():
            if name in results:
                fn(results[name], Path(args.plot))
                console.print(f"wrote {args.plot}")


class _Progress:
    """A rich progress bar over provider rows; `row` advances it and names the last finished."""

    def __init__(self, console: Any, total: int, what: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(what, total=total)

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def say(self, text: str) -> None:
        """Name what runs now without advancing (a phase after the rows, e.g. paired rounds)."""
        self.progress.update(self.task, description=text)

    def row(self, row: dict[str, Any]) -> None:
        self.progress.update(
            self.task, advance=1, description=f"{row.get('provider', '')}: {row.get('status', '')}"
        )


# ---- commands ------------------------------------------------------------------------------------
def cmd_parity(args: argparse.Namespace, console: Any) -> int:
    from .grad_parity import run_grad_parity
    from .parity import run_parity

    # --backward: the gradients (bench/grad_parity.py) instead of the outputs, same report
    run = run_grad_parity if getattr(args, "backward", False) else run_parity
    device, providers, items = _device_providers_items(args)
    with _Progress(console, len(items) * len(providers), "parity") as bar:
        result = run(
            [(s, m) for _, s, m in items],
            providers,
            device,
            on_row=bar.row,
            checkpoint=_checkpoint(args, "parity"),
        )
    results = _results("parity", result)
    rep.print_tables(console, rep.parity_tables(result))
    _write(args, results, console)
    if result["passed"]:
        console.print(f"[green]parity: PASS[/] ({result['counts']})")
        return 0
    console.print("[bold red]parity: FAIL[/]")
    for line in result["failures"]:
        console.print(f"[bold red]  FAILED: {line}[/]")
    for case in result["cases"]:
        for row in case["rows"]:
            if row["status"] in ("FAIL", "error") and row.get("message"):
                console.print(f"[red]{row['provider']}:[/] {row['message']}")
    return 1


def _timing(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "reps", None):
        out["min_reps"] = args.reps
        out["max_reps"] = max(args.reps, 200)
    if getattr(args, "quick", False):
        out.update(warmup_s=0.02, target_s=0.05, max_reps=max(out.get("min_reps", 20), 20))
    return out


def cmd_bench(args: argparse.Namespace, console: Any) -> int:
    if getattr(args, "backward", False):
        return cmd_bench_backward(args, console)
    from .benchmark import run_bench

    device, providers, items = _device_providers_items(args)
    with _Progress(console, len(items) * len(providers), "bench") as bar:
        result = run_bench(
            items,
            providers,
            device,
            quick=args.quick,
            timing=_timing(args),
            on_row=bar.row,
            on_pair=bar.say,
            checkpoint=_checkpoint(args, "bench"),
            paired_rounds=args.paired or 0,
            paired_calls=args.paired_calls or paired.DEFAULT_CALLS,
        )
    results = _results("bench", result)
    rep.print_tables(console, rep.bench_tables(result))
    _write(args, results, console)
    _print_wall(console, "bench", result)
    failed = [
        f"{c.get('preset')} M={c['m']}: {r['provider']}: {r['status']}"
        for c in result["cases"]
        for r in c["rows"]
        if _failed(r)
    ]
    for case in result["cases"]:  # --paired: a pairing that raised fails the run, a skip is said
        for pair in case.get("paired", []):
            where = f"{case.get('preset')} M={case['m']}: {pair['stack']}"
            if "error" in pair:
                failed.append(f"{where}: pairing failed")
                console.print(f"[bold red]paired rounds failed: {where}: {pair['error']}[/]")
            elif "skipped" in pair:
                console.print(f"[yellow]paired rounds skipped: {where}: {pair['skipped']}[/]")
    for line in failed:
        console.print(f"[bold red]not a result: {line}[/]")
    if getattr(args, "derive_auto", None) is not None:
        path = _derive_auto(results, args.derive_auto or None, console)
        failed += _retime_auto(path, result, items, providers, device, args, console)
    return 1 if failed else 0


def cmd_bench_backward(args: argparse.Namespace, console: Any) -> int:
    """`bench --backward`: one training step per provider (bench/bench_backward.py), in the
    results' `bench_backward` section."""
    from fusedmlp.common import dispatch

    from .bench_backward import run_bench_backward

    device, providers, items = _device_providers_items(args)
    deriving = getattr(args, "derive_auto", None) is not None
    # deriving: `auto` rows time our training path (dispatch.training_points_off says why)
    points = dispatch.training_points_off() if deriving else contextlib.nullcontext()
    with points, _Progress(console, len(items) * len(providers), "bench --backward") as bar:
        result = run_bench_backward(
            items,
            providers,
            device,
            saved=args.saved or DEFAULT_SAVED,
            quick=args.quick,
            timing=_timing(args),
            on_row=bar.row,
            checkpoint=_checkpoint(args, "bench_backward"),
        )
    results = _results("bench_backward", result)
    rep.print_tables(console, rep.bench_backward_tables(result))
    _write(args, results, console)
    _print_wall(console, "bench --backward", result)
    failed = [
        f"{c.get('preset')} M={c['m']}: {r['provider']}: {r['status']}"
        for c in result["cases"]
        for r in c["rows"]
        if _failed(r)
    ]
    for line in failed:
        console.print(f"[bold red]not a result: {line}[/]")
    if getattr(args, "derive_auto", None) is not None:
        _derive_auto(results, args.derive_auto or None, console)
    return 1 if failed else 0


def _print_wall(console: Any, what: str, result: dict[str, Any]) -> None:
    """One line of wall time per case, for the GPU runner's time budget (bench/gpu_check.sh)."""
    cases = [c for c in result["cases"] if "wall_s" in c]
    if cases:
        total = sum(c["wall_s"] for c in cases)
        each = ", ".join(f"{c.get('preset')} M={c['m']} {c['wall_s']:.0f}" for c in cases)
        console.print(f"{what}: {total:.0f} s wall over {len(cases)} cases (s each: {each})")


def _retime_auto(
    path: Path,
    result: dict[str, Any],
    items: list,
    providers: list,
    device: str,
    args: argparse.Namespace,
    console: Any,
) -> list[str]:
    """Time the `auto` rows again with the table just derived (installed in this process), so
    the saved run shows what `auto` does with the table committed from it. Returns failures."""
    from fusedmlp.common import dispatch

    from .benchmark import run_bench
    from .metrics import Ceilings

    auto = [p for p in providers if p.impl == "auto"]
    if not auto:
        return []
    dispatch.install(dispatch.Table.from_json(path.read_text()))
    again = run_bench(
        items,
        auto,
        device,
        quick=args.quick,
        timing=_timing(args),
        ceilings=Ceilings.from_dict(result["ceilings"]),
    )
    for case, new in zip(result["cases"], again["cases"], strict=True):
        fresh = {row["provider"]: row for row in new["rows"]}
        case["rows"] = [fresh.get(row["provider"], row) for row in case["rows"]]
    result["auto_table"] = {"path": str(path), "note": "auto rows timed with this table"}
    results = _results("bench", result)
    rep.print_tables(console, rep.bench_tables(result))
    _write(args, results, console)
    _print_wall(console, "auto re-timed", again)
    return [
        f"{c.get('preset')} M={c['m']}: {r['provider']}: {r['status']}"
        for c in again["cases"]
        for r in c["rows"]
        if _failed(r)
    ]


def _derive_auto(
    results: dict[str, Any],
    out: str | None,
    console: Any,
    commits: dict[str, list[str]] | None = None,
) -> Path:
    """The dispatch table of `auto` (common/dispatch.py) from a bench result, written to `out`
    (default: common/dispatch/<gpu>.json in the source tree, to be committed with the results).
    A `bench` section gives the forward points, a `bench_backward` section the training points;
    the file's points of the other phase are kept."""
    from fusedmlp.common import dispatch

    gpus = (results.get("environment") or {}).get("gpus") or []
    gpu = gpus[0].get("name") if gpus else None
    if not gpu:
        raise SystemExit("--derive-auto: the results name no GPU (a CPU run decides nothing)")
    commits = commits or {}
    own = [_commit_of(results)]
    path = Path(out) if out else dispatch.TABLE_DIR / f"{dispatch.gpu_slug(gpu)}.json"
    table = dispatch.Table.from_json(path.read_text()) if path.is_file() else None
    if "bench" in results:
        rows = dispatch.measurements_from_bench(results["bench"])
        source = _source("fusedmlp bench", commits.get("bench") or own)
        table = dispatch.with_phase(table, dispatch.derive(rows, gpu=gpu, source=source), "forward")
    if "bench_backward" in results:
        rows = dispatch.measurements_from_bench_backward(results["bench_backward"])
        source = _source("fusedmlp bench --backward", commits.get("bench_backward") or own)
        derived = dispatch.derive(rows, gpu=gpu, source=source, phase="train")
        table = dispatch.with_phase(table, derived, "train")
    assert table is not None  # the callers pass results with one of the two sections
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.to_json())
    train = sum(p.phase == "train" for p in table.points)
    console.print(
        f"wrote {path}: {len(table.points) - train} forward and {train} training points for {gpu}"
    )
    return path


def cmd_derive_auto(args: argparse.Namespace, console: Any) -> int:
    """`fusedmlp derive-auto RESULTS.json`: the dispatch table from saved bench results."""
    from fusedmlp.common import dispatch

    items = [rep.load(Path(p)) for p in args.results]
    results = rep.merge(items)
    if "bench" not in results and "bench_backward" not in results:
        raise SystemExit("derive-auto: the results hold no bench or bench_backward section")
    # Every file's cases count, not the last file's; files in order, oldest first: a later run's
    # case of the same spec and M replaces an earlier one's (a partial rerun updates its points).
    commits = {}
    for section in ("bench", "bench_backward"):
        with_section = [item for item in items if section in item]
        if len(with_section) > 1:
            parts = [item[section] for item in with_section]
            results[section] = {**parts[-1], "cases": dispatch.newest_cases(parts)}
        commits[section] = [_commit_of(item) for item in with_section]
    _derive_auto(results, args.out, console, commits=commits)
    return 0


def _commit_of(results: dict[str, Any]) -> str:
    return (((results.get("environment") or {}).get("git") or {}).get("commit") or "unknown")[:10]


def _source(what: str, commits: list[str]) -> str:
    """The table's `source`: "<what> at commit C", or "at commits A, B" for a merge (oldest
    first, later cases replacing earlier ones: tests/test_dispatch.py re-derives from it)."""
    commits = list(dict.fromkeys(commits))  # several files of one run name it once
    if len(commits) == 1:
        return f"{what} at commit {commits[0]}"
    return f"{what} at commits {', '.join(commits)}"


def _failed(row: dict[str, Any]) -> bool:
    """Failed parity, raised, or measured below its floor (timing.judge_timing): exit status 1."""
    return row["status"].startswith("FAIL") or row["status"] in ("error", "invalid measurement")


def cmd_overhead(args: argparse.Namespace, console: Any) -> int:
    from .overhead import run_overhead

    device = _device(args)
    providers = _providers(args)
    with _Progress(console, len(providers) + 1, "overhead") as bar:
        result = run_overhead(providers, device, timing=_timing(args), on_row=bar.row)
    # The same compiled kernel called from both frameworks: every difference is the framework's.
    from .cross_overhead import attribute, decompose

    rows, reason = decompose() if device == "cuda" else ([], "the decomposition needs a GPU")
    result["decomposition"] = {"rows": rows, "reason": reason, "attribution": attribute(rows)}
    results = _results("overhead", result)
    rep.print_tables(console, rep.overhead_tables(result))
    _write(args, results, console)
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


def cmd_sweep(args: argparse.Namespace, console: Any) -> int:
    from .sweep import run_sweep

    device = _device(args)
    short = args.short if args.short is not None else device == "cpu"
    with console.status("sweep") as status:
        result = run_sweep(
            device,
            short=short,
            widths=args.widths,
            depths=args.depths,
            m=args.m[0] if args.m else None,
            impls=args.impl,
            timing=_timing(args),
            on_cell=lambda c: status.update(f"sweep: width {c['width']} depth {c['depth']} done"),
            checkpoint=_checkpoint(args, "sweep"),
        )
    results = _results("sweep", result)
    rep.print_tables(console, rep.sweep_tables(result))
    _write(args, results, console)
    bad = [c for c in result["cells"] for r in c["rows"] if _failed(r)]
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace, console: Any) -> int:
    try:
        results = rep.merge([rep.load(Path(p)) for p in args.results])
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fusedmlp report: {exc}") from None
    rep.print_tables(console, rep.tables(results))
    md = Path(args.markdown) if args.markdown else Path(args.results[0]).with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(rep.to_markdown(results))
    console.print(f"wrote {md}")
    plot_dir = Path(args.plot_dir) if args.plot_dir else md.parent
    for path in rep.plot_all(results, plot_dir, stem=args.stem):
        console.print(f"wrote {path}")
    if args.json:
        rep.write_json(results, Path(args.json))
        console.print(f"wrote {args.json}")
    return 0


def cmd_default(args: argparse.Namespace, console: Any) -> int:
    """The main job on the embedded default."""
    device = _device(args)
    # On a CPU, cpu-small runs in its own float32 and again in bfloat16, so that every
    # implementation that runs here is exercised (pallas_mosaic's wgmma takes 16-bit operands only).
    dtypes = (get_preset(DEFAULT_CPU_PRESET).spec.dtype, "bfloat16") if device == "cpu" else None
    ns = argparse.Namespace(
        preset=None,
        spec=None,
        m=None,
        impl=None,
        dtype=dtypes,
        device=device,
        cpu_threads=None,
        json=args.json,
        markdown=args.markdown,
        plot=None,
        inject_fault=None,
        reps=None,
        quick=False,
        derive_auto=getattr(args, "derive_auto", None),
    )
    code = cmd_parity(ns, console)
    if device == "cuda":
        ns.json = str(Path(args.json).with_suffix(".bench.json")) if args.json else None
        ns.markdown = None
        code = max(code, cmd_bench(ns, console))
    return code


# ---- parser --------------------------------------------------------------------------------------
def _case_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        action="append",
        metavar="NAME",
        help=f"preset name(s), comma list or repeated; known: {', '.join(PRESETS)}",
    )
    p.add_argument(
        "--spec",
        action="append",
        metavar="FILE",
        help="an MLPSpec JSON file (MLPSpec.to_json); runs at M=64 unless --m",
    )
    p.add_argument("--m", type=_ints, metavar="LIST", help="batch sizes, e.g. 16,8192")
    p.add_argument(
        "--dtype",
        type=_names,
        metavar="LIST",
        help="run the spec(s) in these dtypes instead (float32,float16,bfloat16)",
    )
    p.add_argument(
        "--fp32-precision",
        type=_names,
        metavar="LIST",
        help="the float32 cases' products: ieee, tf32 or both, e.g. ieee,tf32 (each float32 "
        "spec once per precision; default: the spec's)",
    )


def _common(p: argparse.ArgumentParser, *, plot: bool = True) -> None:
    p.add_argument(
        "--impl",
        metavar="LIST",
        help="implementations: triton, torch:eager, jax, kernels, baselines, ...",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    p.add_argument("--json", metavar="PATH", help="write the results (with environment) as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    if plot:
        p.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    p.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help=f"threads per framework on a CPU (default {DEFAULT_CPU_THREADS}; "
        "0: the frameworks' defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedmlp",
        description="Parity, benchmarks and overheads of the fused MLP in PyTorch/Triton and "
        "JAX/Pallas. With no command: the parity matrix of the default preset on "
        "this machine (CPU), or parity + bench of the default presets (GPU).",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", help=argparse.SUPPRESS)
    parser.add_argument("--derive-auto", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "parity",
        help="every implementation vs the float64 reference and each other; exit 1 on any failure",
    )
    _case_args(p)
    _common(p, plot=False)
    p.add_argument(
        "--backward",
        action="store_true",
        help="the gradients (dx and every param) vs the float64 reference backward, M <= 4096",
    )
    p.add_argument("--inject-fault", action="append", metavar="IMPL", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="side-by-side timings with ceilings and roofline")
    _case_args(p)
    _common(p)
    p.add_argument("--reps", type=int, metavar="N", help="minimum timed repetitions (>= 20)")
    p.add_argument("--quick", action="store_true", help="short warm-up and time targets")
    p.add_argument(
        "--tune",
        action="store_true",
        help="GPU: sweep the Triton kernels' tile configs once per shape (cached in "
        "$FUSEDMLP_TUNING_CACHE) before timing; default: the heuristic configs",
    )
    p.add_argument(
        "--derive-auto",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="GPU: write auto's dispatch table from this run's timings (default "
        "common/dispatch/<gpu>.json; with --backward its training points, the forward's kept)",
    )
    p.add_argument(
        "--backward",
        action="store_true",
        help="time one training step (forward + backward, dx and every param's gradient) and "
        "its peak memory instead of the forward; gradients gated by parity first",
    )
    p.add_argument(
        "--saved",
        choices=SAVED_POLICIES,
        help=f"with --backward: what our paths keep for the backward (default {DEFAULT_SAVED})",
    )
    p.add_argument(
        "--paired",
        type=_positive,
        metavar="ROUNDS",
        help="then time each stack's auto and its baselines again in ROUNDS interleaved rounds "
        "and report their ratios per round (bench/paired.py: drift between rows cancels)",
    )
    p.add_argument(
        "--paired-calls",
        type=_positive,
        metavar="N",
        help=f"with --paired: calls a sample (default {paired.DEFAULT_CALLS}, about a row's; on a "
        "card at its power limit shorter samples read a burst, not a sustained load)",
    )
    p.add_argument("--inject-fault", action="append", metavar="IMPL", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("derive-auto", help="auto's dispatch table from saved bench results")
    p.add_argument("results", nargs="+", metavar="RESULTS.json")
    p.add_argument("--out", metavar="PATH", help="default: common/dispatch/<gpu>.json")
    p.set_defaults(func=cmd_derive_auto)

    p = sub.add_parser("overhead", help="host/device time per call and first-call costs")
    _common(p)
    p.add_argument("--reps", type=int, metavar="N", help="minimum timed repetitions (>= 20)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_overhead)

    p = sub.add_parser("sweep", help="narrow MLPs: fused_small speedup over the best baselines")
    _common(p)
    p.add_argument(
        "--short", action="store_true", default=None, help="the short CPU grid (default on a CPU)"
    )
    p.add_argument("--full", dest="short", action="store_false", help="the full grid on a CPU")
    p.add_argument("--widths", type=_ints, metavar="LIST")
    p.add_argument("--depths", type=_ints, metavar="LIST")
    p.add_argument("--m", type=_ints, metavar="M")
    p.add_argument("--reps", type=int, metavar="N", help="minimum timed repetitions (>= 20)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown tables and PNG plots from saved results")
    p.add_argument("results", nargs="+", metavar="RESULTS.json")
    p.add_argument("--markdown", metavar="PATH", help="default: RESULTS.md beside the first file")
    p.add_argument("--plot-dir", metavar="DIR", help="default: the Markdown file's folder")
    p.add_argument("--stem", default="", help="prefix of the PNG file names")
    p.add_argument("--json", metavar="PATH", help="also write the merged results")
    p.set_defaults(func=cmd_report)

    from .models import add_parser as add_models_parser  # `fusedmlp models` (bench/models.py)

    add_models_parser(sub)
    from .compress import add_parser as add_compress_parser  # `fusedmlp compress`

    add_compress_parser(sub)
    from .train import add_parser as add_train_parser  # `fusedmlp train` (bench/train.py)

    add_train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # JAX would otherwise take 75% of the GPU's memory at start-up, leaving torch (which owns the
    # shared buffers) the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if getattr(args, "reps", None) is not None and args.reps < 20:
        parser.error(f"--reps: expected at least 20, got {args.reps}")
    if getattr(args, "saved", None) and not getattr(args, "backward", False):
        parser.error("--saved: only with --backward (the forward keeps nothing)")
    if getattr(args, "backward", False) and args.command == "bench" and args.tune:
        parser.error("--tune: not with --backward (it concerns the forward's kernels)")
    if getattr(args, "backward", False) and getattr(args, "paired", None):
        parser.error("--paired: not with --backward (it pairs the forward's rows)")
    if getattr(args, "paired", None) and getattr(args, "derive_auto", None) is not None:
        # the auto rows are timed again under the derived table; the pairs would be the old auto's
        parser.error("--paired: not with --derive-auto (run it after, under the derived table)")
    if getattr(args, "paired_calls", None) and not getattr(args, "paired", None):
        parser.error("--paired-calls: only with --paired")
    console = _console()
    func = getattr(args, "func", None)
    return (func or cmd_default)(args, console)


if __name__ == "__main__":
    sys.exit(main())
