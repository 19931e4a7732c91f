"""`fusedmlp models`: FusedMLP as a drop-in in real models (issue 23 item 4).

Small Llama, Gemma and GPT-2 models from transformers' own classes (2 layers, random weights;
on a GPU the MLP shapes of the issue — Llama 2048→8192, Gemma 2048→16384, GPT-2 768→3072 — and
8 × 512 tokens), every MLP swapped for `FusedMLP.from_hf`:

1. logits against a float64 copy of the original model under the tolerance policy (the
   original's own logits are the baseline of the 2× rule): eager and
   `torch.compile(fullgraph=True)`, in bfloat16 and under autocast (float32 params, bfloat16
   compute);
2. the forward time of each model beside the original's, eager and compiled: device time
   (the harness's: the sum of each call's kernel durations from torch.profiler, every call after
   an L2 flush; bench/timing.py) and host time per call apart (the issue time of N calls with no
   sync between, per call);
3. one MLP: FusedMLP against the Hugging Face module it replaces at 1, 16, 512 and 4096 tokens,
   eager and compiled (the same two times), with the route the compiled FusedMLP took, read off
   the graph Dynamo traced: our launches as graph nodes (torch_impl/graph_op.py), the opaque op,
   or the baseline's ops traced in.

On a CPU the models are tiny (hidden 42–45), the kernels run under Triton's interpreter, nothing
is timed (an interpreter's speed says nothing), and the compiled checks use the aot_eager backend;
tests/test_models.py runs exactly that in CI and the GPU sizes (checks only) under `pytest -m gpu`.

    fusedmlp models [--device cuda|cpu] [--models llama,gemma,gpt2] [--tokens 1,16,512,4096]
                    [--budget SECONDS] [--sections models,overhead,cross] [--json PATH]

Two more sections (issue 23 items 2 and 3, GPU only): `overhead`, FusedMLP's host time per call
above its launches' own (the same launchers called directly), at the Llama MLP shape; `cross`, the
same compiled kernel from both frameworks (bench/cross_overhead.decompose) as cross/native ratios.

`--budget` (default 60 s) bounds the run: once spent, the remaining compiled timings are listed
as skipped, never silently dropped. Nothing runs at import (torch is imported by `run`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "gemma", "gpt2")
TOKENS = (1, 16, 512, 4096)


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    heads: int
    head_dim: int | None = None
    vocab: int = 8192
    layers: int = 2
    batch: int = 8
    seq: int = 512


# GPU: the MLP shapes (Gemma: gemma-2b's 2048→16384), 8 × 512 tokens. CPU: tiny and odd
# where the classes allow (RoPE needs an even head dim), for the interpreter.
SIZES: dict[str, dict[str, ModelSize]] = {
    "cuda": {
        "llama": ModelSize(2048, 8192, 16),
        "gemma": ModelSize(2048, 16384, 8, head_dim=256),
        "gpt2": ModelSize(768, 3072, 12),
    },
    "cpu": {
        "llama": ModelSize(42, 73, 3, vocab=97, batch=2, seq=7),
        "gemma": ModelSize(42, 73, 3, head_dim=14, vocab=97, batch=2, seq=7),
        "gpt2": ModelSize(45, 73, 5, vocab=97, batch=2, seq=7),
    },
}


# ---- models --------------------------------------------------------------------------------------
def build_model(family: str, size: ModelSize, device: str, dtype: Any, seed: int = 0) -> Any:
    """A transformers causal LM of `family` with random weights, in eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        config = tf.LlamaConfig(
            hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_attention_heads=size.heads, num_key_value_heads=size.heads,
            num_hidden_layers=size.layers, vocab_size=size.vocab,
        )  # fmt: skip
        cls = tf.LlamaForCausalLM
    elif family == "gemma":
        config = tf.GemmaConfig(
            hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_attention_heads=size.heads, num_key_value_heads=size.heads,
            head_dim=size.head_dim, num_hidden_layers=size.layers, vocab_size=size.vocab,
        )  # fmt: skip
        cls = tf.GemmaForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(
            n_embd=size.hidden, n_inner=size.intermediate, n_head=size.heads,
            n_layer=size.layers, vocab_size=size.vocab, n_positions=max(1024, size.seq),
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    with torch.device(device):  # initialised where it runs: no host-side init of the weights
        model = cls(config)
    return model.to(dtype).eval()


def blocks(model: Any) -> list[Any]:
    """The transformer blocks, each with an `mlp`."""
    inner = getattr(model, "model", None) or model.transformer
    return list(getattr(inner, "layers", None) or inner.h)


def swap(model: Any, impl: str = "auto") -> Any:
    """`model` with every block's MLP replaced by its FusedMLP (in place; returned)."""
    from fusedmlp.torch_impl import FusedMLP

    for block in blocks(model):
        block.mlp = FusedMLP.from_hf(block.mlp, impl=impl)
    return model


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(ids).logits


def check(ours: Any, ref64: Any, baseline: Any, spec: Any) -> dict[str, Any]:
    """The tolerance policy on logits: `ours` against the float64 model, `baseline` (the
    original model in the same precision) as the 2× rule's framework error."""
    from fusedmlp.common.tolerance import compare

    def np_(t: Any) -> Any:
        return t.detach().float().cpu().numpy()

    result = compare(np_(ours), ref64.detach().cpu().numpy(), spec, baseline=np_(baseline))
    return {
        "passed": result.passed,
        "rel_fro": result.rel_fro,
        "baseline_rel_fro": result.baseline_rel_fro,
        "report": result.report(),
    }


# ---- timing --------------------------------------------------------------------------------------
def device_timing(fn: Callable[[], Any]) -> Any:
    """One call's device time as the harness defines it (bench/timing.py): the sum of the call's
    kernel durations read by torch.profiler, each call after an L2 flush (a DeviceTiming). (CUDA
    events around one call would read host time for the small-token MLPs, whose front is slower
    than their kernels.)"""
    import torch

    from .timing import reps_for, time_device, warmup

    def wait(_: Any) -> None:
        torch.cuda.synchronize()

    per_call = warmup(lambda i: fn(), wait)
    return time_device("torch", lambda i: fn(), reps_for(per_call), wait)


def device_ms(fn: Callable[[], Any]) -> float:
    """Median device time of one call (ms): `device_timing`'s."""
    return device_timing(fn).device.median * 1e3


# Kernels listed per timed cell, longest total first: where a swapped model's time goes (a whole
# model's call is ~40 kernels; the MLPs' and the rest's are told apart by name).
TOP_KERNELS = 12


def top_kernels(timing: Any, count: int = TOP_KERNELS) -> list[list[Any]]:
    """[[kernel name (120 chars at most), calls of it per call, total µs per call], ...]: the
    `count` largest by total median time."""
    totals: dict[str, list[float]] = {}
    for name, seconds in zip(timing.kernel_names, timing.kernel_times, strict=False):
        entry = totals.setdefault(name[:120], [0, 0.0])
        entry[0] += 1
        entry[1] += seconds * 1e6
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:count]
    return [[name, int(n), round(us, 1)] for name, (n, us) in ranked]


def host_us(fn: Callable[[], Any], calls: int = 50, batches: int = 5) -> float:
    """Host time per call: `calls` calls issued back to back, no sync between, per call (µs);
    the median of `batches` such batches (one batch of 50 spread by ±20 µs between repeats on
    the H200's host: single batches made the overhead table a coin toss)."""
    import torch

    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def paired_host_us(
    base: Callable[[], Any], ours: Callable[[], Any], calls: int = 50, pairs: int = 9
) -> tuple[float, float, float]:
    """(base µs, ours µs, ours − base µs) per call: batches of `calls` calls of each, issued in
    pairs (base then ours, ours then base, alternately: no order bias), no sync within a batch;
    medians of each and the median of the `pairs` per-pair differences (not the difference of
    the medians). Two separate medians drifted apart on the H200's host (one session read −30
    to +55 µs "above the launches" for the same code): a pair shares the host's state of the
    moment, so the difference is what it measures."""
    import torch

    def batch(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        return elapsed

    base(), ours()
    torch.cuda.synchronize()
    measured = []
    for i in range(pairs):
        if i % 2:
            o = batch(ours)
            measured.append((batch(base), o))
        else:
            b = batch(base)
            measured.append((b, batch(ours)))
    return (
        statistics.median(b for b, _ in measured),
        statistics.median(o for _, o in measured),
        statistics.median(o - b for b, o in measured),
    )


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.seconds


def _timed(fn: Callable[[], Any], timed: bool) -> dict[str, Any]:
    if not timed:
        return {"status": "not timed"}
    timing = device_timing(fn)
    return {
        "status": "timed",
        "device_ms": timing.device.median * 1e3,
        "host_us": host_us(fn),
        "kernels_per_call": timing.kernels_per_call,
        "top_kernels": top_kernels(timing),
    }


# ---- one family ----------------------------------------------------------------------------------
def run_family(
    family: str,
    device: str,
    tokens: Sequence[int],
    budget: Budget,
    compile_backend: str | None,
    impl: str = "auto",
    *,
    size: ModelSize | None = None,
    timed: bool | None = None,
) -> dict[str, Any]:
    """Checks (always) and timings (`timed`: default on a GPU) of one family. `compile_backend`
    None is inductor; the autocast check always compiles with aot_eager (it proves the trace and
    the numbers; inductor's time is spent once, on the bf16 model that is also timed)."""
    import torch

    size = size or SIZES[device][family]
    timed = device == "cuda" if timed is None else timed
    bf16 = torch.bfloat16
    original = build_model(family, size, device, bf16)
    fused = swap(copy.deepcopy(original), impl)
    spec = blocks(fused)[0].mlp.spec
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=gen).to(device)
    ref64 = logits(copy.deepcopy(original).double(), ids)
    out: dict[str, Any] = {
        "family": family,
        "size": size.__dict__,
        "spec": str(spec),
        "tokens": size.batch * size.seq,
        "checks": {},
        "model": {},
        "mlp": [],
    }
    backend = compile_backend or "inductor"

    def compiled(module: Any, **kw: Any) -> Any:
        return torch.compile(module, fullgraph=True, backend=backend, dynamic=False, **kw)

    # 1. logits: eager and compiled, bf16 and autocast
    base = logits(original, ids)
    out["checks"]["bf16 eager"] = check(logits(fused, ids), ref64, base, spec)
    fused_c = compiled(fused)
    out["checks"]["bf16 compiled"] = check(logits(fused_c, ids), ref64, base, spec)
    original32 = copy.deepcopy(original).float()
    fused32 = swap(copy.deepcopy(original32), impl)
    with torch.autocast(device, dtype=bf16):
        base32 = logits(original32, ids)
        out["checks"]["autocast eager"] = check(logits(fused32, ids), ref64, base32, spec)
        fused32_c = torch.compile(fused32, fullgraph=True, backend="aot_eager", dynamic=False)
        out["checks"]["autocast compiled"] = check(logits(fused32_c, ids), ref64, base32, spec)
    del original32, fused32, fused32_c

    # 2. whole-model forward time, eager and compiled
    with torch.no_grad():
        out["model"]["original eager"] = _timed(lambda: original(ids), timed)
        out["model"]["fused eager"] = _timed(lambda: fused(ids), timed)
        if timed and budget.left():
            original_c = compiled(original)
            original_c(ids)
            out["model"]["original compiled"] = _timed(lambda: original_c(ids), timed)
            fused_c(ids)
            out["model"]["fused compiled"] = _timed(lambda: fused_c(ids), timed)
        else:
            skipped = {"status": "skipped (budget)" if timed else "not timed"}
            out["model"]["original compiled"] = out["model"]["fused compiled"] = skipped

    # 3. one MLP: the HF module against its FusedMLP
    from fusedmlp.torch_impl import FusedMLP

    hf = blocks(original)[0].mlp
    ours = FusedMLP.from_hf(hf, impl=impl)
    for m in tokens if timed else (min(tokens),):
        x = torch.randn(m, size.hidden, device=device, dtype=bf16, generator=None)
        row: dict[str, Any] = {"tokens": m, "plan": _plan(ours, x)}
        with torch.no_grad():
            row["hf eager"] = _timed(lambda x=x: hf(x), timed)
            row["fused eager"] = _timed(lambda x=x: ours(x), timed)
            if timed and budget.left():
                targets: set[str] = set()
                hf_c = compiled(hf)
                ours_c = torch.compile(
                    ours, fullgraph=True, backend=_recording(backend, targets), dynamic=False
                )
                hf_c(x), ours_c(x)
                row["fused compiled route"] = _route(targets)
                row["hf compiled"] = _timed(lambda x=x, f=hf_c: f(x), timed)
                row["fused compiled"] = _timed(lambda x=x, f=ours_c: f(x), timed)
            else:
                skipped = {"status": "skipped (budget)" if timed else "not timed"}
                row["hf compiled"] = row["fused compiled"] = skipped
        out["mlp"].append(row)
    return out


def _recording(backend: str, targets: set[str]) -> Any:
    """`backend` (a registered name) that first adds the call targets of each graph Dynamo hands
    it to `targets`: which route a compiled FusedMLP took (`_route`)."""
    from torch._dynamo.backends.registry import lookup_backend

    compile_graph = lookup_backend(backend)

    def record(gm: Any, example_inputs: Any) -> Any:
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_graph(gm, example_inputs)

    return record


def _route(targets: set[str]) -> str:
    """What a compiled FusedMLP's graph held: our launches as graph nodes (graph_op.py), the
    opaque op, or the baseline's ops traced in (module._traced_baseline)."""
    if any("mlp_launches" in t for t in targets):
        return "launches in the graph"
    if any("fusedmlp.mlp" in t for t in targets):
        return "opaque op"
    return "baseline ops traced"


def _plan(module: Any, x: Any) -> str:
    from fusedmlp.torch_impl import plan

    return plan(module.spec, tuple(x.shape), impl=module.impl, device=x.device.type).describe()


# ---- host time above the launches (issue 23 item 2) ---------------------------------------------
def run_overhead(device: str, impl: str = "auto") -> list[dict[str, Any]]:
    """FusedMLP's host time per call against its launches' own: the same launchers called
    directly with the plan's arguments (what `front._RUNNERS` does after the cached plan), both
    issued back to back with no sync (host-bound at these sizes), in alternating batches
    (`paired_host_us`). The Llama MLP whatever `--models` says. Target: ≤ 30 µs above."""
    import torch

    from fusedmlp.torch_impl import FusedMLP, front

    if device != "cuda":
        return [{"status": "not timed on a CPU (the kernels run interpreted)"}]
    rows = []
    hf = blocks(build_model("llama", SIZES["cuda"]["llama"], device, torch.bfloat16))[0].mlp
    ours = FusedMLP.from_hf(hf, impl=impl)
    for m in (1, 16, 512):
        x = torch.randn(m, ours.spec.d_in, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            ours(x)
            call = front.prepare(x, ours.packed_params(), ours.spec, ours.impl)
            params = ours.packed_params()
            if call.convert:
                params |= front._CONVERTED.get(ours.spec, params, call.layouts)
            runner = front._RUNNERS[call.plan.impl]

            def launches(x=x, call=call, params=params, runner=runner):
                return runner(x, params, ours.spec, call.plan, None)

            launches_us, no_grad_us, above_us = paired_host_us(launches, lambda x=x: ours(x))
            row = {
                "tokens": m,
                "plan": call.plan.describe(),
                "launches_host_us": launches_us,
                "fused_no_grad_host_us": no_grad_us,
                "above_launches_us": above_us,
            }
        # Grad mode with trainable params: the training path (the saving forward, which keeps
        # what the backward needs: a different computation from the launches above).
        _, row["fused_grad_mode_host_us"], row["op_path_above_launches_us"] = paired_host_us(
            launches, lambda x=x: ours(x)
        )
        row["hf_host_us"] = host_us(lambda x=x: hf(x))
        rows.append(row)
    return rows


# ---- cross-stack at native speed (issue 23 item 3) -----------------------------------------------
def run_cross() -> dict[str, Any]:
    """The same compiled kernel from both frameworks (bench/cross_overhead.decompose, the harness'
    measurement), summarised as cross/native ratios. Target: device within 5 %."""
    try:
        from .cross_overhead import decompose
    except Exception as exc:  # the harness module moved: say so, do not fail the run
        return {"status": f"bench.cross_overhead unavailable: {type(exc).__name__}: {exc}"}
    try:
        rows, reason = decompose(m=4096, n=4096, k=4096)
    except Exception as exc:  # the harness' API changed, or a route failed outside its rows
        return {"status": f"decompose failed: {type(exc).__name__}: {exc}", "rows": []}
    if reason is not None:
        return {"status": reason, "rows": []}
    ratios = []
    for kernel in sorted({r["kernel"] for r in rows}):  # "triton.linear_act", "mosaic.gated", ...
        native, cross = ("torch", "jax") if kernel.startswith("triton") else ("jax", "torch")
        by = {r["framework"]: r for r in rows if r["kernel"] == kernel}
        if native in by and cross in by:
            ratios.append(
                {
                    "kernel": kernel,
                    "device_ratio": by[cross]["device_us"] / by[native]["device_us"],
                    "host_us_native": by[native]["host_issue_us"],
                    "host_us_cross": by[cross]["host_issue_us"],
                    "same_bits": by[cross].get("same_bits"),
                    "note": by[cross].get("note", ""),
                }
            )
    return {"status": "measured", "rows": rows, "ratios": ratios}


# ---- the command ---------------------------------------------------------------------------------
def _fmt(cell: dict[str, Any]) -> str:
    if cell.get("status") != "timed":
        return cell.get("status", "-")
    return f"{cell['device_ms'] * 1e3:8.1f} µs dev {cell['host_us']:6.1f} µs host"


def table(result: dict[str, Any]) -> str:
    """The compact table printed at the end (also in the JSON's `table`)."""
    lines = [f"fusedmlp models — {result['device']} ({result['env']}), {result['seconds']:.0f} s"]
    for row in result.get("overhead", []):
        if "tokens" not in row:
            lines.append(f"overhead: {row.get('status')}")
            continue
        lines.append(
            f"overhead M={row['tokens']:<4d} launches {row['launches_host_us']:6.1f} µs, FusedMLP "
            f"{row['above_launches_us']:+6.1f} µs (no_grad), "
            f"{row['op_path_above_launches_us']:+6.1f} µs (training path), "
            f"HF module {row['hf_host_us']:6.1f} µs  [{row['plan']}]"
        )
    cross = result.get("cross")
    if cross:
        lines.append(f"cross-stack: {cross['status']}")
        for r in cross.get("ratios", []):
            lines.append(
                f"  {r['kernel']:18s} device cross/native {r['device_ratio']:.3f}, host "
                f"{r['host_us_native']:.1f} -> {r['host_us_cross']:.1f} µs, same bits "
                f"{r['same_bits']} {r['note']}"
            )
    for fam in result["families"]:
        lines.append(f"\n{fam['family']}: MLP {fam['spec']}, {fam['tokens']} tokens")
        for name, c in fam["checks"].items():
            mark = "PASS" if c["passed"] else "FAIL"
            base = c["baseline_rel_fro"]
            lines.append(
                f"  logits {name:18s} {mark} rel_fro {c['rel_fro']:.2e} (original {base:.2e})"
                if base is not None
                else f"  logits {name:18s} {mark}"
            )
        for name, cell in fam["model"].items():
            lines.append(f"  model {name:19s} {_fmt(cell)}")
        for row in fam["mlp"]:
            for name in ("hf eager", "fused eager", "hf compiled", "fused compiled"):
                route = row.get("fused compiled route") if name == "fused compiled" else None
                note = f"  ({route})" if route else ""
                lines.append(f"  mlp M={row['tokens']:<5d} {name:15s} {_fmt(row[name])}{note}")
    return "\n".join(lines)


SECTIONS = ("models", "overhead", "cross")


def run(
    device: str,
    families: Sequence[str] = FAMILIES,
    tokens: Sequence[int] = TOKENS,
    budget_s: float = 60.0,
    impl: str = "auto",
    sections: Sequence[str] = SECTIONS,
) -> dict[str, Any]:
    import torch

    import fusedmlp.torch_impl  # noqa: F401  (before transformers, which imports triton)

    budget = Budget(budget_s)
    backend = None if device == "cuda" else "aot_eager"
    # Each family compiles its models and MLP shapes once (dynamic=False, one graph per shape).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    env = f"torch {torch.__version__}"
    if device == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    result: dict[str, Any] = {"device": device, "env": env, "impl": impl, "families": []}
    if "overhead" in sections:
        result["overhead"] = run_overhead(device, impl)
    if "cross" in sections and device == "cuda":
        result["cross"] = run_cross()
    if "models" in sections:
        for family in families:
            result["families"].append(run_family(family, device, tokens, budget, backend, impl))
    result["seconds"] = time.perf_counter() - budget.start
    result["passed"] = all(c["passed"] for f in result["families"] for c in f["checks"].values())
    result["table"] = table(result)
    return result


def add_parser(sub: Any) -> None:
    """The `models` subcommand of bench/cli.py."""
    p = sub.add_parser(
        "models",
        help="FusedMLP swapped into small Llama/Gemma/GPT-2 models: "
        "logits checks and forward times",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    p.add_argument("--models", default=",".join(FAMILIES), help="comma list: " + ",".join(FAMILIES))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="per-MLP token counts")
    p.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds before compiled timings are skipped (default 60)",
    )
    p.add_argument("--impl", default="auto", help="FusedMLP's impl (default auto)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma list of models (logits + times), overhead (host time above the "
        "launches), cross (jax_triton and torch:mosaic vs native)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=lambda args, console: main_args(args))


def main_args(args: argparse.Namespace) -> int:
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    families = tuple(f for f in args.models.split(",") if f)
    tokens = tuple(int(t) for t in args.tokens.split(",") if t)
    sections = tuple(t for t in args.sections.split(",") if t)
    result = run(args.device, families, tokens, args.budget, args.impl, sections)
    print(result["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["passed"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedmlp.bench.models")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return main_args(args)


if __name__ == "__main__":
    sys.exit(main())
