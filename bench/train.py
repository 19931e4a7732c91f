"""`fusedmlp train`: two real training tasks with their data shipped, our kernels against the
plain baselines from the same init and data order, both stacks, under one precision policy.

    fusedmlp train image [--stack torch,jax] [--impl auto,baseline] [--precision bf16,fp16]
                         [--steps N] [--seed N] [--device cpu|cuda] [--out DIR]
    fusedmlp train lm    [... the same ...]

Tasks (the data ships with the installed packages: nothing is downloaded):
- `image`: scikit-image's astronaut photograph (512×512 RGB), downsampled by block means to
  `--size` (CPU default 64, GPU 256); pixel centres in [0, 1]² → frequency encoding
  (sin, cos of 2^k·π·coord, k < 8: 32 features) → a 64-wide MLP with 4 hidden ReLU layers → RGB,
  MSE against the pixels, every pixel every step (full batch: the data order is the identity);
  PSNR = −10·log10(MSE) per step; the reconstruction is written as PNG beside the original.
- `lm`: a byte-level language model on CPython's own documentation (`pydoc_data.topics`, 466 KB of
  UTF-8): the last 10 % is held out. A fixed-context MLP LM: the embeddings of the last `context`
  bytes concatenated (d = context·embed) → `blocks` residual blocks h += FFN(rmsnorm(h)) whose
  FFNs are SwiGLU MLPs (d → hidden → d, no bias) → rmsnorm → logits over 256 bytes;
  cross-entropy of the next byte. Windows are drawn by a seeded NumPy generator once, before the
  runs, so every run sees the same batches; validation loss on fixed held-out windows.

`--impl`: the stack's implementation names (`auto`, `fused_small`, `triton`, `pallas_triton`, ...)
run through FusedMLP (torch) / `jax_impl.mlp` (JAX); `baseline` is the same model written with
`nn.Linear` (torch) / plain `jax.numpy` (JAX). Every run starts from the same init
(`fusedmlp.common.init_params` for each MLP, a seeded NumPy generator for the rest) and is trained
with Adam (torch.optim.Adam / optax.adam, same hyper-parameters) under the policy of
`common/precision.py` (torch_impl/training.py, jax_impl/training.py).

On a CPU our kernels run under their interpreters: a run of an interpreted implementation stops
after `--interpreted-steps` (default 3) steps, so the defaults finish in about a minute; the
baselines run all `--steps`.

Outputs in `--out` (default ./train-results): `train-<task>.json` (a fusedmlp results file with a
`train` section: curves, step times, final metrics, environment), `train-<task>.png` (the curves,
one panel per stack and precision, every implementation on it), for `image` the original and each
run's reconstruction as PNG (`image-original.png`, `image-<stack>-<precision>-<impl>.png`) and
all of them side by side (`image-compare.png`).
`fusedmlp report train-<task>.json` renders a saved run again. Step time: the wall time of the
training steps after the first `WARMUP_STEPS` (compilation, autotuning), synchronised at the
evaluation points and at the end, divided by their number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusedmlp.common import MLPSpec, TileConfig, init_params
from fusedmlp.common.packing import pack_params
from fusedmlp.common.precision import DEFAULT_PRECISION, PRECISIONS, Policy, get_policy

TASKS = ("image", "lm")
STACKS = ("torch", "jax")
BASELINE = "baseline"
WARMUP_STEPS = 3  # excluded from the step time: compilation, autotuning, first allocations
DEFAULT_INTERPRETED_STEPS = 3
LR_DECAY = 0.1  # the learning rate decays exponentially to LR_DECAY × lr at the last step
CROSS_STACK_FIRST = 10  # steps over which the two stacks' curves are compared closely
# Interpreted runs (CPU) pin large tiles: the interpreters cost ~4 ms per program iteration, and
# the heuristic's interpreter tiles (16×32×16, sized for the tests' odd shapes) make the 4096-row
# image fit ~2,000 iterations per kernel — minutes a step; 128×64×64 makes it ~32.
INTERPRETED_CONFIG = TileConfig(block_m=128, block_n=64, block_k=64, group_m=1, num_stages=1)
# JAX --graph: steps per jitted call (jax_impl/training.py `make_train_loop`, a lax.scan). One
# dispatch (a jitted call ~30 µs on the H200) shared by 50 steps is < 1 µs a step, against the
# image fit's 167-580 µs of host time a step at one call each; longer chunks could gain < 1 µs a
# step. 50 divides both tasks' GPU `eval_every` (500, 50), so a run has three chunk lengths, each
# one compile: 3 (the warm-up), 47 (the rest of the first segment, steps 453-500), 50.
SCAN_STEPS = 50


# ---- task configurations -------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageConfig:
    size: int = 64  # pixels per side after downsampling (512: the photograph's own)
    freqs: int = 8  # frequency encoding: sin, cos of 2^k·π·c, k < freqs, per coordinate
    width: int = 64
    hidden_layers: int = 4
    lr: float = 1e-2
    steps: int = 300
    eval_every: int = 100
    seed: int = 0

    @property
    def spec(self) -> MLPSpec:
        widths = (4 * self.freqs, *([self.width] * self.hidden_layers), 3)
        return MLPSpec(widths, "relu", bias=True, dtype="float32")


@dataclass(frozen=True)
class LMConfig:
    context: int = 8
    embed: int = 16
    hidden: int = 128
    blocks: int = 2
    batch: int = 128
    lr: float = 2e-3
    steps: int = 300
    eval_every: int = 50
    val_windows: int = 1024
    seed: int = 0

    @property
    def d_model(self) -> int:
        return self.context * self.embed

    @property
    def spec(self) -> MLPSpec:
        return MLPSpec((self.d_model, self.hidden, self.d_model), "swiglu", False, "float32")


# The real runs (H200): the photograph at 256² (65,536 pixels a step; --size 512 for all 262,144:
# the backward's weight gradient reduces over every row in one program per 64×64 output tile, so
# the fused step time grows with the rows and 2,000 steps at 512² would not fit the GPU budget);
# an LM whose FFNs are 1024 → 4096 → 1024 SwiGLU GEMMs at M = 4096 rows.
GPU_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {"size": 256, "steps": 2000, "eval_every": 500},
    "lm": {
        "context": 32,
        "embed": 32,
        "hidden": 4096,
        "blocks": 4,
        "batch": 4096,
        "lr": 5e-4,
        "steps": 300,
        "eval_every": 50,
        "val_windows": 8192,
    },
}


def task_config(task: str, device: str, **overrides: Any) -> ImageConfig | LMConfig:
    """The task's defaults on `device`, with the given (non-None) fields replaced."""
    cls = {"image": ImageConfig, "lm": LMConfig}[task]
    fields = dict(GPU_DEFAULTS[task]) if device == "cuda" else {}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**fields)


# ---- data (NumPy, shared by both stacks) ---------------------------------------------------------
def astronaut(size: int) -> np.ndarray:
    """skimage's astronaut, [size, size, 3] float32 in [0, 1], by block means (512 % size == 0)."""
    from skimage import data

    img = data.astronaut().astype(np.float32) / 255.0
    if 512 % size:
        raise ValueError(f"size: expected a divisor of 512 (the photograph's side), got {size}")
    f = 512 // size
    return img.reshape(size, f, size, f, 3).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def frequency_encoding(coords: np.ndarray, freqs: int) -> np.ndarray:
    """[P, 2] coords in [0, 1] → [P, 4·freqs]: sin and cos of 2^k·π·c (NeRF's encoding)."""
    scales = (2.0 ** np.arange(freqs)) * np.pi
    angles = coords[:, :, None] * scales  # [P, 2, freqs]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).reshape(len(coords), -1)


def image_data(cfg: ImageConfig) -> dict[str, np.ndarray]:
    img = astronaut(cfg.size)
    centres = (np.arange(cfg.size, dtype=np.float64) + 0.5) / cfg.size
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    coords = np.stack([yy.ravel(), xx.ravel()], axis=1)
    x = frequency_encoding(coords, cfg.freqs).astype(np.float32)
    return {"x": x, "rgb": img.reshape(-1, 3), "image": img}


def corpus() -> np.ndarray:
    """CPython's pydoc topics as bytes (uint8), topics in sorted order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def lm_data(cfg: LMConfig) -> dict[str, np.ndarray]:
    """Train/validation bytes (90/10) and the windows' start offsets of every step."""
    data = corpus()
    cut = int(len(data) * 0.9)
    train, val = data[:cut], data[cut:]
    rng = np.random.default_rng(cfg.seed)
    span = cfg.context + 1  # context bytes, then the byte to predict
    starts = rng.integers(0, len(train) - span, size=(cfg.steps, cfg.batch), dtype=np.int64)
    val_starts = np.random.default_rng(cfg.seed + 1).integers(
        0, len(val) - span, size=cfg.val_windows, dtype=np.int64
    )
    return {"train": train, "val": val, "starts": starts, "val_starts": val_starts}


def windows(data: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    return data[starts[:, None] + np.arange(span)]


# ---- init (NumPy, shared by both stacks and every implementation) --------------------------------
def image_init(cfg: ImageConfig) -> dict[str, np.ndarray]:
    return init_params(cfg.spec, cfg.seed)


def lm_init(cfg: LMConfig) -> dict[str, Any]:
    """embed [256, E]: N(0, 1); blocks: init_params of the FFN spec (seed + 1 + i), the down
    projection scaled by 1/√(2·blocks) (GPT-2's residual scaling, so the stream stays O(1));
    out [d, 256]: N(0, 1/d)."""
    rng = np.random.default_rng(cfg.seed)
    spec = cfg.spec
    blocks = []
    for i in range(cfg.blocks):
        p = init_params(spec, cfg.seed + 1 + i)
        p["w1"] = (p["w1"] / math.sqrt(2 * cfg.blocks)).astype(np.float32)
        blocks.append(p)
    embed = rng.standard_normal((256, cfg.embed)).astype(np.float32)
    out = (rng.standard_normal((cfg.d_model, 256)) / math.sqrt(cfg.d_model)).astype(np.float32)
    return {"embed": embed, "blocks": blocks, "out": out}


# ---- results of one run --------------------------------------------------------------------------
@dataclass
class Run:
    stack: str
    impl: str
    precision: str
    steps: int = 0
    loss: list[float] = dataclasses.field(default_factory=list)
    val_steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    scale: list[float] = dataclasses.field(default_factory=list)  # fp16: loss scale per step
    step_time_s: float | None = None
    warmup_s: float | None = None
    interpreted: bool = False
    chosen: str = ""  # what `impl` runs for this task's MLP in training (its plan)
    plan: str = ""
    final: dict[str, float] = dataclasses.field(default_factory=dict)
    image: str | None = None
    note: str = ""
    # --graph: torch replays every step from one CUDA graph; JAX runs SCAN_STEPS steps a call
    graph: bool = False

    @property
    def label(self) -> str:
        return f"{self.stack}:{self.impl}{_stepping(self.stack, self.graph)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Clock:
    """Training-step wall time, excluding the first WARMUP_STEPS, synchronised by `sync`."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.total = 0.0
        self.count = 0
        self.warmup = 0.0

    def segment(self, run_steps: Callable[[int, int], None], start: int, stop: int) -> None:
        self.sync()
        t0 = time.perf_counter()
        run_steps(start, stop)
        self.sync()
        dt = time.perf_counter() - t0
        if start < WARMUP_STEPS:
            self.warmup += dt
        else:
            self.total += dt
            self.count += stop - start

    def finish(self, run: Run) -> None:
        run.warmup_s = self.warmup
        run.step_time_s = self.total / self.count if self.count else None


def _stepping(stack: str, graph: bool) -> str:
    """A --graph run's tag in labels, tables and plots: torch's step replayed from one CUDA
    graph, "(graph)"; JAX's steps scanned SCAN_STEPS to a jitted call, "(scan)"."""
    if not graph:
        return ""
    return " (graph)" if stack == "torch" else " (scan)"


def _segments(steps: int, eval_every: int) -> list[tuple[int, int]]:
    marks = {0, min(WARMUP_STEPS, steps), steps}
    marks |= set(range(eval_every, steps, eval_every))
    bounds = sorted(m for m in marks if m <= steps)
    return list(itertools.pairwise(bounds))


def lr_factor(step: int, steps: int) -> float:
    """The learning-rate multiplier of `step` (both stacks): a smooth decay, so that the end
    points compared between implementations are not caught in one of Adam's loss spikes."""
    return LR_DECAY ** (step / steps)


def psnr(mse: float) -> float:
    return -10.0 * math.log10(mse) if mse > 0 else float("inf")


# ---- PyTorch -------------------------------------------------------------------------------------
def _torch_mlp(
    spec: MLPSpec,
    params: dict[str, np.ndarray],
    impl: str,
    device: str,
    config: TileConfig | None = None,
) -> Any:
    """FusedMLP(spec, impl) holding `params` (packed), or the nn.Linear baseline of the spec."""
    import torch
    from torch import nn

    from fusedmlp.torch_impl import FusedMLP

    if impl != BASELINE:
        fused = FusedMLP(spec, impl=impl, config=config, device=device, seed=None)
        return fused.load_params(params)

    def linear(w: np.ndarray, b: np.ndarray | None) -> nn.Linear:
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device=device)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            if b is not None:
                lin.bias.copy_(torch.from_numpy(b))
        return lin

    class Baseline(nn.Module):
        """The spec's MLP as a user writes it: nn.Linear layers, torch activations."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.ModuleList()
            self.v = nn.ModuleList()
            for layer in spec.layers():
                i = layer.index
                self.w.append(linear(params[f"w{i}"], params.get(f"b{i}")))
                if layer.gated:
                    self.v.append(linear(params[f"v{i}"], params.get(f"c{i}")))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            act = {"relu": torch.relu, "silu": torch.nn.functional.silu}[spec.base_activation]
            for layer in spec.layers():
                i = layer.index
                if layer.gated:
                    h = act(self.w[i](h)) * self.v[i](h)
                elif layer.activation != "identity":
                    h = act(self.w[i](h))
                else:
                    h = self.w[i](h)
            return h

    return Baseline()


def _torch_rmsnorm(h: Any) -> Any:
    import torch

    h = h.float()  # rule 3: norms in float32
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def _torch_lm(
    cfg: LMConfig, init: dict[str, Any], impl: str, device: str, config: TileConfig | None
) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Parameter(torch.from_numpy(init["embed"]).to(device))
            self.ffn = nn.ModuleList(
                _torch_mlp(cfg.spec, p, impl, device, config) for p in init["blocks"]
            )
            self.out = nn.Linear(cfg.d_model, 256, bias=False, device=device)
            with torch.no_grad():
                self.out.weight.copy_(torch.from_numpy(np.ascontiguousarray(init["out"].T)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # A lookup is not a GEMM: the table is read in float32 (autocast leaves it alone).
            # F.embedding, not self.embed[x]: the indexing form's backward (index_put_ with
            # accumulate) cost ~4.4 ms of the H200's step for 131,072 lookups into 256 rows (the
            # graphed step 8.37 -> 3.96 ms with F.embedding). Its CUDA backward accumulates a row's
            # duplicates with atomics, so the torch LM's curves are not bitwise reproducible from
            # run to run (the image fit's are).
            h = F.embedding(x, self.embed).reshape(x.shape[0], -1)
            for ffn in self.ffn:
                h = h + ffn(_torch_rmsnorm(h)).float()  # the residual stream in float32
            return self.out(_torch_rmsnorm(h)).float()

    return LM()


def _torch_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _torch_interpreted(impl: str, device: str) -> bool:
    from fusedmlp.torch_impl import is_interpreted

    return impl != BASELINE and is_interpreted(impl, device)


def _torch_optimizer(model: Any, lr: float, device: str, steps: int) -> tuple[Any, Any]:
    import torch

    from fusedmlp.torch_impl import training as tt

    # fused Adam on CUDA: one launch for every param, the same for every implementation, with its
    # lr in a device tensor in every run (what a CUDA graph needs), so that the eager and the
    # graphed runs of an implementation do the same arithmetic.
    if device == "cuda":
        opt = tt.graph_capturable_optimizer(model.parameters(), lr, device)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps))


def _torch_stepper(
    model: Any, loss_fn: Any, batch: Any, opt: Any, scaler: Any, policy: Policy, graph: bool
) -> Callable[[Any], Any]:
    """step(batch) -> loss: the eager `train_step`, or one CUDA graph replayed (`graph`)."""
    from fusedmlp.torch_impl import training as tt

    if graph:
        # the capture is the last of the WARMUP_STEPS untimed steps: the clock sees replays only
        return tt.GraphedTrainStep(
            model, loss_fn, batch, opt, scaler, policy, warmup=WARMUP_STEPS - 1
        )
    return lambda b: tt.train_step(model, loss_fn, b, opt, scaler, policy)


def _scale_trace(scales: list[Any]) -> list[float]:
    import torch

    return torch.stack(scales).cpu().tolist() if scales else []


def torch_image(
    cfg: ImageConfig,
    data: dict,
    impl: str,
    policy: Policy,
    device: str,
    steps: int,
    tick,
    graph: bool = False,
) -> tuple[Run, np.ndarray]:
    import torch
    import torch.nn.functional as F

    from fusedmlp.torch_impl import training as tt

    run = Run("torch", impl, policy.name, interpreted=_interpreted("torch", impl, device))
    run.graph = graph
    config = INTERPRETED_CONFIG if run.interpreted else None
    model = _torch_mlp(cfg.spec, image_init(cfg), impl, device, config)
    tt.check_master(model, policy)
    x = torch.from_numpy(data["x"]).to(device)
    rgb = torch.from_numpy(data["rgb"]).to(device)
    opt, schedule = _torch_optimizer(model, cfg.lr, device, cfg.steps)
    scaler = tt.make_scaler(policy, device)

    def loss_fn(m: Any, batch: Any) -> Any:
        return F.mse_loss(m(batch[0]).float(), batch[1])

    losses: list[Any] = []
    scales: list[Any] = []  # fp16: the scale after each step, kept on the device (no sync a step)
    step = _torch_stepper(model, loss_fn, (x, rgb), opt, scaler, policy, graph)

    def run_steps(start: int, stop: int) -> None:
        for _ in range(start, stop):
            losses.append(step((x, rgb)))
            schedule.step()
            if policy.loss_scale is not None:
                scales.append(tt.scale_tensor(scaler).clone())
            tick()

    clock = _Clock(_torch_sync(device))
    for start, stop in _segments(steps, cfg.eval_every):
        clock.segment(run_steps, start, stop)
    clock.finish(run)
    tt.check_master(model, policy)
    run.scale = _scale_trace(scales)
    run.steps = steps
    run.loss = torch.stack(losses).cpu().tolist() if losses else []
    with torch.no_grad(), tt.autocast(policy, device):
        out = model(x).float().clamp(0, 1)
    mse = float(((out - rgb) ** 2).mean())
    run.final = {"loss": mse, "psnr": psnr(mse)}
    return run, out.cpu().numpy().reshape(cfg.size, cfg.size, 3)


def torch_lm(
    cfg: LMConfig,
    data: dict,
    impl: str,
    policy: Policy,
    device: str,
    steps: int,
    tick,
    graph: bool = False,
) -> Run:
    import torch
    import torch.nn.functional as F

    from fusedmlp.torch_impl import training as tt

    run = Run("torch", impl, policy.name, interpreted=_interpreted("torch", impl, device))
    run.graph = graph
    config = INTERPRETED_CONFIG if run.interpreted else None
    model = _torch_lm(cfg, lm_init(cfg), impl, device, config)
    tt.check_master(model, policy)
    train = torch.from_numpy(data["train"].astype(np.int64)).to(device)
    starts = torch.from_numpy(data["starts"]).to(device)
    offsets = torch.arange(cfg.context + 1, device=device)
    val = torch.from_numpy(windows(data["val"], data["val_starts"], cfg.context + 1)).to(device)
    opt, schedule = _torch_optimizer(model, cfg.lr, device, cfg.steps)
    scaler = tt.make_scaler(policy, device)

    def loss_fn(m: Any, w: Any) -> Any:
        return F.cross_entropy(m(w[:, :-1]), w[:, -1])

    def evaluate() -> float:
        total = torch.zeros((), device=device)
        with torch.no_grad(), tt.autocast(policy, device):
            for chunk in val.long().split(cfg.batch):
                total += F.cross_entropy(model(chunk[:, :-1]), chunk[:, -1], reduction="sum")
        return float(total) / len(val)

    losses: list[Any] = []
    scales: list[Any] = []
    step = _torch_stepper(
        model, loss_fn, train[starts[0][:, None] + offsets], opt, scaler, policy, graph
    )

    def run_steps(start: int, stop: int) -> None:
        for s in range(start, stop):
            losses.append(step(train[starts[s][:, None] + offsets]))
            schedule.step()
            if policy.loss_scale is not None:
                scales.append(tt.scale_tensor(scaler).clone())
            tick()

    clock = _Clock(_torch_sync(device))
    for start, stop in _segments(steps, cfg.eval_every):
        if start in (0, *range(cfg.eval_every, steps, cfg.eval_every)):
            run.val_steps.append(start)
            run.val_loss.append(evaluate())
        clock.segment(run_steps, start, stop)
    clock.finish(run)
    tt.check_master(model, policy)
    run.scale = _scale_trace(scales)
    run.val_steps.append(steps)
    run.val_loss.append(evaluate())
    run.steps = steps
    run.loss = torch.stack(losses).cpu().tolist() if losses else []
    run.final = {"loss": run.loss[-1] if run.loss else math.nan, "val_loss": run.val_loss[-1]}
    return run


# ---- JAX -----------------------------------------------------------------------------------------
def _jax_device(device: str) -> Any:
    import jax

    return jax.devices("cpu" if device == "cpu" else "gpu")[0]


def _jax_interpreted(impl: str, device: str) -> bool:
    from fusedmlp.jax_impl import is_interpreted

    return impl != BASELINE and is_interpreted(impl, device)


def _jax_mlp_params(spec: MLPSpec, params: dict[str, np.ndarray], impl: str) -> dict[str, Any]:
    """The MLP's master params as the implementation reads them: packed for our kernels (once,
    here: `jax_impl.mlp` would otherwise repack every step), plain for the baseline."""
    import jax.numpy as jnp

    held = params if impl == BASELINE else pack_params(spec, params)
    return {k: jnp.asarray(v) for k, v in held.items()}


def _jax_apply_mlp(
    spec: MLPSpec, impl: str, policy: Policy, config: TileConfig | None = None
) -> Callable[[Any, Any], Any]:
    """h (any float dtype), master params → the MLP's output in the compute dtype (rules 1, 2)."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl.training import cast_to_compute, jnp_dtype, policy_mlp

    cdt = jnp_dtype(policy.compute_dtype)
    act = {"relu": jax.nn.relu, "silu": jax.nn.silu}[spec.base_activation]

    def fused(h: Any, params: Any) -> Any:
        return policy_mlp(h, params, spec, policy, impl=impl, config=config)

    def baseline(h: Any, params: Any) -> Any:
        # Plain jax.numpy as a careful user writes it: compute-dtype operands, float32
        # accumulation, bias and activation in float32, one rounding per layer output.
        p = cast_to_compute(params, policy)
        h = h.astype(cdt)
        for layer in spec.layers():
            i = layer.index

            def linear(h: Any, w: str, b: str) -> Any:
                z = jnp.dot(h, p[w], preferred_element_type=jnp.float32)
                return z + p[b].astype(jnp.float32) if b in p else z

            z = linear(h, f"w{i}", f"b{i}")
            if layer.gated:
                z = act(z) * linear(h, f"v{i}", f"c{i}")
            elif layer.activation != "identity":
                z = act(z)
            h = z.astype(cdt)
        return h

    return baseline if impl == BASELINE else fused


def _jax_rmsnorm(h: Any) -> Any:
    import jax
    import jax.numpy as jnp

    h = h.astype(jnp.float32)
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def _jax_losses(items: list[Any]) -> list[float]:
    """Per-step values from a run's list of step scalars, or of [K] arrays (scanned chunks)."""
    import jax.numpy as jnp

    if not items:
        return []
    flat = jnp.concatenate(items) if items[0].ndim else jnp.stack(items)
    return np.asarray(flat).astype(float).tolist()


def _jax_train(
    run: Run,
    step: Callable[..., Any] | None,
    state: list[Any],
    batch_of: Callable[..., Any],
    steps: int,
    cfg: Any,
    policy: Policy,
    tick: Callable[[], None],
    before_segment: Callable[[int], None] | None = None,
    loop: Callable[..., Any] | None = None,
) -> None:
    """The JAX runs' step loop (both tasks): `step(*state, batch_of(s), lr)` per step, timed by
    segment (`before_segment(start)` runs untimed first, e.g. an evaluation), then the run's
    losses, loss scales and step count. `state` [params, optimizer state, loss scale] is updated
    in place. With `loop` (`make_train_loop`, --graph; `step` unused) each segment runs in chunks
    of at most SCAN_STEPS steps, one call `loop(*state, batch_of(start, stop), lrs)` each (the
    batches of the chunk's steps stacked, or None); a chunk never crosses a segment's end."""
    import jax
    import jax.numpy as jnp

    from fusedmlp.jax_impl import training as jt

    losses: list[Any] = []
    scales: list[Any] = []
    # The schedule's factors on the device before the clock starts: a NumPy scalar argument is a
    # host-to-device copy in every step's dispatch (bench/jax_step_probe.py: 248 against 167 µs of
    # host time a step for the image fit on the H200).
    factors = np.asarray([lr_factor(s, cfg.steps) for s in range(steps)], np.float32)
    segments = _segments(steps, cfg.eval_every)
    clock = _Clock(lambda: jax.block_until_ready(state))

    if loop is None:
        lr_factors = [jax.device_put(f) for f in factors]

        def run_steps(start: int, stop: int) -> None:
            for s in range(start, stop):
                *new, loss = step(*state, batch_of(s), lr_factors[s])
                state[:] = new
                losses.append(loss)
                scales.append(state[2].scale)
                tick()

    else:
        # Before the clock: every chunk's inputs on the device, and one executable per chunk
        # length, compiled ahead (lowered from the real arguments, which lowering does not
        # consume) and, where a timed chunk is its first use, run once on a copy of the state
        # (discarded): a jit call would compile inside the first timed chunk of a new length,
        # and its first run is slow (the image fit's 4-step chunk, 8² pixels, on the CPU: 34 ms
        # the first run, 0.9 ms from the third). That time is counted as warm-up.
        chunks = [
            (a, min(a + SCAN_STEPS, stop))
            for start, stop in segments
            for a in range(start, stop, SCAN_STEPS)
        ]
        inputs = {(a, b): (batch_of(a, b), jax.device_put(factors[a:b])) for a, b in chunks}
        t0 = time.perf_counter()
        compiled = {}
        for (a, b), args in inputs.items():
            if b - a in compiled:
                continue
            compiled[b - a] = loop.lower(*state, *args).compile()
            if a >= WARMUP_STEPS:
                spare = jax.tree.map(jnp.copy, state[:2])  # the loop donates params and moments
                jax.block_until_ready(compiled[b - a](*spare, state[2], *args))
        clock.warmup += time.perf_counter() - t0

        def run_steps(start: int, stop: int) -> None:
            for a in range(start, stop, SCAN_STEPS):
                b = min(a + SCAN_STEPS, stop)
                *new, chunk_losses, chunk_scales = compiled[b - a](*state, *inputs[(a, b)])
                state[:] = new
                losses.append(chunk_losses)
                scales.append(chunk_scales)
                for _ in range(a, b):
                    tick()

    for start, stop in segments:
        if before_segment is not None:
            before_segment(start)
        clock.segment(run_steps, start, stop)
    clock.finish(run)
    jt.check_master(state[0], policy)
    run.steps = steps
    run.loss = _jax_losses(losses)
    if policy.loss_scale is not None:
        run.scale = _jax_losses(scales)


def jax_image(
    cfg: ImageConfig,
    data: dict,
    impl: str,
    policy: Policy,
    device: str,
    steps: int,
    tick,
    graph: bool = False,
) -> tuple[Run, np.ndarray]:
    import jax
    import jax.numpy as jnp
    import optax

    from fusedmlp.jax_impl import training as jt

    run = Run("jax", impl, policy.name, interpreted=_interpreted("jax", impl, device))
    run.graph = graph
    with jax.default_device(_jax_device(device)):
        params = _jax_mlp_params(cfg.spec, image_init(cfg), impl)
        jt.check_master(params, policy)
        config = INTERPRETED_CONFIG if run.interpreted else None
        apply = _jax_apply_mlp(cfg.spec, impl, policy, config)
        x, rgb = jnp.asarray(data["x"]), jnp.asarray(data["rgb"])

        def loss_fn(p: Any, batch: Any) -> Any:
            y = apply(batch[0], p).astype(jnp.float32)
            return jnp.mean((y - batch[1]) ** 2)

        opt = optax.adam(cfg.lr)
        state = [params, opt.init(params), jt.init_loss_scale(policy)]
        if graph:
            # Every step's batch is the whole image: the scanned loss closes over it (batches
            # None), for our kernels and the baseline alike.
            loop = jt.make_train_loop(lambda p, _: loss_fn(p, (x, rgb)), opt, policy)
            _jax_train(run, None, state, lambda a, b: None, steps, cfg, policy, tick, loop=loop)
        else:
            step = jt.make_train_step(loss_fn, opt, policy)
            _jax_train(run, step, state, lambda s: (x, rgb), steps, cfg, policy, tick)
        out = jnp.clip(jax.jit(apply)(x, state[0]).astype(jnp.float32), 0, 1)
        mse = float(jnp.mean((out - rgb) ** 2))
    run.final = {"loss": mse, "psnr": psnr(mse)}
    return run, np.asarray(out).reshape(cfg.size, cfg.size, 3)


def jax_lm(
    cfg: LMConfig,
    data: dict,
    impl: str,
    policy: Policy,
    device: str,
    steps: int,
    tick,
    graph: bool = False,
) -> Run:
    import jax
    import jax.numpy as jnp
    import optax

    from fusedmlp.jax_impl import training as jt
    from fusedmlp.jax_impl.training import cast_to_compute

    run = Run("jax", impl, policy.name, interpreted=_interpreted("jax", impl, device))
    run.graph = graph
    init = lm_init(cfg)
    span = cfg.context + 1
    with jax.default_device(_jax_device(device)):
        params = {
            "embed": jnp.asarray(init["embed"]),
            "blocks": [_jax_mlp_params(cfg.spec, p, impl) for p in init["blocks"]],
            "out": jnp.asarray(init["out"]),
        }
        jt.check_master(params, policy)
        config = INTERPRETED_CONFIG if run.interpreted else None
        apply_ffn = _jax_apply_mlp(cfg.spec, impl, policy, config)
        cdt = jt.jnp_dtype(policy.compute_dtype)

        def logits(p: Any, x: Any) -> Any:
            h = p["embed"][x].reshape(x.shape[0], -1)  # float32: a lookup is not a GEMM
            for block in p["blocks"]:
                h = h + apply_ffn(_jax_rmsnorm(h), block).astype(jnp.float32)
            out = cast_to_compute(p["out"], policy)
            z = jnp.dot(_jax_rmsnorm(h).astype(cdt), out, preferred_element_type=jnp.float32)
            return z.astype(cdt).astype(jnp.float32)  # as autocast's Linear: a 16-bit output

        def xent(p: Any, w: Any) -> Any:
            logp = jax.nn.log_softmax(logits(p, w[:, :-1]), axis=-1)
            return -jnp.take_along_axis(logp, w[:, -1:].astype(jnp.int32), axis=-1)[:, 0]

        train = jnp.asarray(data["train"].astype(np.int32))
        starts = jnp.asarray(data["starts"].astype(np.int32))
        offsets = jnp.arange(span, dtype=jnp.int32)

        def loss_fn(p: Any, start_row: Any) -> Any:
            return jnp.mean(xent(p, train[start_row[:, None] + offsets]))

        val = windows(data["val"], data["val_starts"], span).astype(np.int32)
        val_sum = jax.jit(lambda p, w: jnp.sum(xent(p, w)))

        def evaluate() -> float:
            total = sum(
                float(val_sum(state[0], jnp.asarray(val[i : i + cfg.batch])))
                for i in range(0, len(val), cfg.batch)
            )
            return total / len(val)

        opt = optax.adam(cfg.lr)
        # The table stays float32, as torch.autocast leaves nn.Embedding (the torch twin's).
        step = loop = None
        if graph:  # a chunk's batches: its steps' rows of window starts, [K, batch]
            loop = jt.make_train_loop(loss_fn, opt, policy, keep=("embed",))
        else:
            step = jt.make_train_step(loss_fn, opt, policy, keep=("embed",))
        state = [params, opt.init(params), jt.init_loss_scale(policy)]

        def validate(start: int) -> None:  # before each eval_every-th segment (untimed)
            if start in (0, *range(cfg.eval_every, steps, cfg.eval_every)):
                run.val_steps.append(start)
                run.val_loss.append(evaluate())

        batch_of = (lambda a, b: starts[a:b]) if graph else (lambda s: starts[s])
        _jax_train(run, step, state, batch_of, steps, cfg, policy, tick, validate, loop)
        run.val_steps.append(steps)
        run.val_loss.append(evaluate())
    run.final = {"loss": run.loss[-1] if run.loss else math.nan, "val_loss": run.val_loss[-1]}
    return run


RUNNERS = {
    ("torch", "image"): torch_image,
    ("torch", "lm"): torch_lm,
    ("jax", "image"): jax_image,
    ("jax", "lm"): jax_lm,
}


# ---- the runs of one command ---------------------------------------------------------------------
def _interpreted(stack: str, impl: str, device: str) -> bool:
    # `auto` on a CPU resolves to one of our kernels (no dispatch table there): interpreted.
    if impl == "auto":
        return device == "cpu"
    return (_torch_interpreted if stack == "torch" else _jax_interpreted)(impl, device)


def _plan(
    stack: str,
    cfg: ImageConfig | LMConfig,
    impl: str,
    policy: Policy,
    device: str,
    graphed: bool = False,
):
    """(chosen implementation, plan text) of the task's MLP in a training call (a graphed torch
    run's: as planned inside `graph_safe`, what the capture ran)."""
    if impl == BASELINE:
        return ("nn.Linear" if stack == "torch" else "jax.numpy"), ""
    context: Any = contextlib.nullcontext()
    if stack == "torch":
        from fusedmlp.torch_impl import graph_safe, plan

        context = graph_safe() if graphed else context
    else:
        from fusedmlp.jax_impl import plan
    spec = cfg.spec.replace(dtype=policy.compute_dtype)
    m = cfg.size**2 if isinstance(cfg, ImageConfig) else cfg.batch
    try:
        with context:
            the_plan = plan(spec, (m, spec.d_in), impl=impl, device=device, saved="preact")
    except (NotImplementedError, ValueError) as exc:
        return impl, f"no plan: {exc}"
    return the_plan.impl, the_plan.describe()


def run_task(
    task: str,
    cfg: ImageConfig | LMConfig,
    *,
    stacks: Sequence[str],
    impls: Sequence[str],
    precisions: Sequence[str],
    device: str,
    out_dir: Path | None = None,
    interpreted_steps: int = DEFAULT_INTERPRETED_STEPS,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    graph: str = "off",
) -> dict[str, Any]:
    """Every (stack, precision, impl) run of `task`; the `train` section of a results file.
    `checkpoint` gets the section so far after each run (a time limit keeps what finished).
    `graph`: "off" one call a step (torch eager, JAX one jitted step), "on" torch replays one
    CUDA graph a step and JAX runs SCAN_STEPS steps a jitted call (`make_train_loop`), "both"
    each run twice."""
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph: expected one of {GRAPH_MODES}, got {graph!r}")
    data = image_data(cfg) if task == "image" else lm_data(cfg)
    if out_dir is not None and task == "image":
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png(data["image"], out_dir / "image-original.png")
    runs = []
    for stack in stacks:
        for precision in precisions:
            policy = get_policy(precision)
            for impl, graphed in itertools.product(impls, _graph_flags(graph)):
                interpreted = _interpreted(stack, impl, device)
                steps = min(cfg.steps, interpreted_steps) if interpreted else cfg.steps
                what = f"{task} {stack}:{impl}{_stepping(stack, graphed)} {precision}"
                tick = progress(what, steps) if progress else None
                result = RUNNERS[(stack, task)](
                    cfg, data, impl, policy, device, steps, tick or (lambda: None), graphed
                )
                run, image = result if task == "image" else (result, None)
                run.chosen, run.plan = _plan(stack, cfg, impl, policy, device, graphed)
                if interpreted:
                    run.note = f"interpreted: {steps} of {cfg.steps} steps"
                if image is not None and out_dir is not None:
                    tag = "-" + _stepping(stack, graphed).strip(" ()") if graphed else ""
                    path = out_dir / f"image-{stack}-{precision}-{impl}{tag}.png"
                    save_png(image, path)
                    run.image = path.name
                runs.append(run.to_dict())
                if checkpoint is not None:
                    checkpoint(_section(task, device, cfg, runs))
    return _section(task, device, cfg, runs)


GRAPH_MODES = ("off", "on", "both")


def _graph_flags(graph: str) -> tuple[bool, ...]:
    if graph == "off":
        return (False,)
    return (True,) if graph == "on" else (False, True)


def _section(task: str, device: str, cfg: ImageConfig | LMConfig, runs: list[dict]) -> dict:
    return {
        "task": task,
        "device": device,
        "config": dataclasses.asdict(cfg),
        "spec": cfg.spec.to_dict(),
        "runs": runs,
        "summary": summarize(runs),
    }


def _baseline_of(runs: list[dict], run: dict, graph: bool | None = None) -> dict | None:
    """The baseline run of `run`'s stack and precision, stepped as `run` is (eager or graph)
    unless `graph` says which."""
    want = (
        run["stack"],
        run["precision"],
        BASELINE,
        run.get("graph", False) if graph is None else graph,
    )
    for r in runs:
        if (r["stack"], r["precision"], r["impl"], r.get("graph", False)) == want:
            return r
    return None


def summarize(runs: list[dict]) -> list[dict[str, Any]]:
    """Per run: the end point, its gap to the baseline of the same stack and precision (PSNR in
    dB, or validation loss relative), the speedup over it, and the largest relative gap to the
    other stack's run of the same implementation and precision over the common steps."""
    rows = []
    for run in runs:
        base = _baseline_of(runs, run)
        row: dict[str, Any] = {
            "stack": run["stack"],
            "impl": run["impl"],
            "graph": run.get("graph", False),
            "chosen": run["chosen"],
            "precision": run["precision"],
            "steps": run["steps"],
            **run["final"],
            "step_time_s": run["step_time_s"],
            "skipped_steps": _skipped(run["scale"]),
            "note": run["note"],
        }
        comparable = base is not None and base is not run and base["steps"] == run["steps"]
        if comparable:
            if "psnr" in run["final"]:
                row["psnr_gap_db"] = run["final"]["psnr"] - base["final"]["psnr"]
            if "val_loss" in run["final"]:
                row["val_loss_gap"] = run["final"]["val_loss"] / base["final"]["val_loss"] - 1
            if run["step_time_s"] and base["step_time_s"]:
                row["speedup"] = base["step_time_s"] / run["step_time_s"]
        other = next(
            (
                r
                for r in runs
                if r["stack"] != run["stack"]
                and (r["impl"], r["precision"]) == (run["impl"], run["precision"])
            ),
            None,
        )
        if other is not None:
            # Over the first steps (where rounding, not the chaos of a long training run, makes
            # the gap: Adam's sign-like first steps amplify it) and over the whole common curve.
            n = min(len(run["loss"]), len(other["loss"]))
            if n:
                a, b = np.asarray(run["loss"][:n]), np.asarray(other["loss"][:n])
                rel = np.abs(a - b) / np.abs(b)
                row["cross_stack_max_rel"] = float(np.max(rel))
                row["cross_stack_max_rel_first"] = float(np.max(rel[:CROSS_STACK_FIRST]))
        eager = _baseline_of(runs, run, graph=False)
        timed = eager is not None and eager["steps"] == run["steps"] and eager["step_time_s"]
        if run.get("graph") and timed and run["step_time_s"]:
            row["speedup_vs_eager"] = eager["step_time_s"] / run["step_time_s"]
        rows.append(row)
    return rows


def _skipped(scale: list[float]) -> int:
    """Steps skipped by loss scaling: the scale went down after them."""
    return sum(1 for a, b in zip([*scale[:1], *scale], scale, strict=False) if b < a)


# ---- outputs -------------------------------------------------------------------------------------
def save_png(image: np.ndarray, path: Path) -> Path:
    from .report import _plt

    path.parent.mkdir(parents=True, exist_ok=True)
    _plt().imsave(path, np.clip(image, 0.0, 1.0))
    return path


def train_tables(train: dict[str, Any]) -> list[Any]:
    from .report import Table, fmt_num, fmt_time

    image = train["task"] == "image"
    headers = ["stack", "impl", "precision", "steps"]
    headers += ["PSNR dB", "Δ vs baseline dB"] if image else ["val loss", "Δ vs baseline"]
    graphs = any(r.get("graph") for r in train["summary"])
    headers += ["step time", "speedup", *(["vs eager baseline"] if graphs else [])]
    headers += ["skipped", "torch↔jax first", "torch↔jax all", "note"]
    rows = []
    for r in train["summary"]:
        gap = r.get("psnr_gap_db") if image else r.get("val_loss_gap")
        impl = (
            r["impl"]
            if r.get("chosen", r["impl"]) in (r["impl"], "nn.Linear", "jax.numpy")
            else f"{r['impl']} → {r['chosen']}"
        )
        rows.append(
            [
                r["stack"],
                impl + _stepping(r["stack"], r.get("graph", False)),
                r["precision"],
                str(r["steps"]),
                fmt_num(r.get("psnr" if image else "val_loss"), ".3f"),
                fmt_num(gap, "+.3f") if image else fmt_num(gap, "+.2%"),
                fmt_time(r["step_time_s"]),
                fmt_num(r.get("speedup"), ".2f"),
                *([fmt_num(r.get("speedup_vs_eager"), ".2f")] if graphs else []),
                str(r["skipped_steps"]),
                fmt_num(r.get("cross_stack_max_rel_first"), ".1e"),
                fmt_num(r.get("cross_stack_max_rel"), ".1e"),
                r["note"],
            ]
        )
    cfg = train["config"]
    what = (
        f"image fit: astronaut {cfg['size']}², widths {train['spec']['widths']}"
        if image
        else f"byte LM: context {cfg['context']}, d {cfg['context'] * cfg['embed']}, "
        f"SwiGLU hidden {cfg['hidden']} × {cfg['blocks']} blocks, batch {cfg['batch']}"
    )
    return [
        Table(
            f"Training, {what}, on {train['device']}",
            headers,
            rows,
            caption="speedup: the baseline's step time (same stack and precision, stepped the "
            "same way: one call a step — torch eager, JAX one jitted step — or (graph) one CUDA "
            f"graph replayed a step, (scan) {SCAN_STEPS} steps a jitted JAX call) / this run's; "
            "vs eager baseline: the baseline's step time at one call a step / this (graph) or "
            "(scan) run's; "
            "skipped: fp16 steps skipped by loss scaling; torch↔jax: the largest relative gap "
            f"between the two stacks' training-loss curves (same impl and precision) over the "
            f"first {CROSS_STACK_FIRST} steps and over all",
        )
    ]


def plot_train(train: dict[str, Any], path: Path) -> Path:
    from .report import _plt, save_chart

    plt = _plt()
    image = train["task"] == "image"
    panels = sorted({(r["stack"], r["precision"]) for r in train["runs"]})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True
    )
    for ax, (stack, precision) in zip(axes[0], panels, strict=True):
        for r in train["runs"]:
            if (r["stack"], r["precision"]) != (stack, precision) or not r["loss"]:
                continue
            loss = np.asarray(r["loss"], dtype=float)
            x = np.arange(1, len(loss) + 1)
            style = "--" if r["impl"] == BASELINE else "-"
            name = r["impl"] + _stepping(r["stack"], r.get("graph", False))
            if image:
                ax.plot(x, -10 * np.log10(loss), style, lw=1.2, label=name)
            else:
                (line,) = ax.plot(x, loss, style, lw=0.8, alpha=0.6, label=f"{name} train")
                ax.plot(
                    r["val_steps"], r["val_loss"], "o" + style, ms=3, color=line.get_color(),
                    label=f"{name} val",
                )  # fmt: skip
        ax.set_title(f"{stack}, {precision}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("PSNR (dB)" if image else "cross-entropy (nats/byte)")
    fig.suptitle(f"fusedmlp train {train['task']} on {train['device']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_chart(fig, path)


def plot_images(train: dict[str, Any], out_dir: Path) -> Path | None:
    """The original photograph beside every run's reconstruction, titled with its PSNR."""
    from .report import _plt

    runs = [r for r in train["runs"] if r.get("image") and (out_dir / r["image"]).exists()]
    if train["task"] != "image" or not runs or not (out_dir / "image-original.png").exists():
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(2.6 * (len(runs) + 1), 3.2), squeeze=False)
    panels = [("original", "image-original.png")]
    for r in runs:
        what = f"{r['stack']}:{r['impl']}{_stepping(r['stack'], r.get('graph', False))}"
        what += f" {r['precision']}"
        panels.append((f"{what}\n{r['final']['psnr']:.2f} dB, {r['steps']} steps", r["image"]))
    for ax, (title, name) in zip(axes[0], panels, strict=True):
        ax.imshow(plt.imread(out_dir / name))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "image-compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line --------------------------------------------------------------------------------
def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parser(sub: Any) -> None:
    """The `train` subcommand of bench/cli.py."""
    p = sub.add_parser(
        "train",
        help="train on real data (image fit, byte LM) with our kernels and the baselines",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--stack", type=_names, default=STACKS, help="torch,jax (default both)")
    p.add_argument(
        "--impl",
        type=_names,
        default=("auto", BASELINE),
        help=f"the stack's implementations and/or '{BASELINE}' (default auto,{BASELINE})",
    )
    p.add_argument(
        "--precision",
        type=_names,
        default=(DEFAULT_PRECISION,),
        help=f"{','.join(PRECISIONS)} (default {DEFAULT_PRECISION})",
    )
    p.add_argument("--steps", type=int, help="training steps (default: the task's, per device)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    p.add_argument("--size", type=int, help="image: pixels per side (a divisor of 512)")
    p.add_argument("--lr", type=float, help="Adam's learning rate (default: the task's)")
    p.add_argument("--batch", type=int, help="lm: windows per step")
    p.add_argument(
        "--seed",
        type=int,
        help="the init's seed (and the LM's data order); default 0. One seed's end point moves "
        "by tenths of a dB with any change of rounding: compare means over several seeds",
    )
    p.add_argument(
        "--interpreted-steps",
        type=int,
        default=DEFAULT_INTERPRETED_STEPS,
        help=f"steps of an interpreted implementation (default {DEFAULT_INTERPRETED_STEPS})",
    )
    p.add_argument(
        "--graph",
        choices=GRAPH_MODES,
        default="off",
        help="'on': torch runs (CUDA only) capture the training step once as a CUDA graph and "
        f"replay it every step; JAX runs take {SCAN_STEPS} steps a jitted call (lax.scan); the "
        "baselines' too. 'both' makes each run twice, one call a step and graphed/scanned "
        "(default off)",
    )
    p.add_argument("--out", metavar="DIR", default="train-results", help="JSON, PNGs")
    p.set_defaults(func=cmd_train)


def _check_args(args: argparse.Namespace) -> None:
    bad_stack = [s for s in args.stack if s not in STACKS]
    if bad_stack:
        raise SystemExit(f"fusedmlp train: --stack: expected torch and/or jax, got {bad_stack}")
    bad = [p for p in args.precision if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"fusedmlp train: --precision: expected {PRECISIONS}, got {bad}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"fusedmlp train: --steps: expected >= 1, got {args.steps}")
    if args.task == "image" and args.batch is not None:
        raise SystemExit("fusedmlp train: --batch: the image task trains on every pixel a step")
    if args.task == "lm" and args.size is not None:
        raise SystemExit("fusedmlp train: --size: an image option, got task lm")
    for stack in args.stack:
        from fusedmlp.common.registry import impl_names

        known = (*impl_names(stack), "auto", BASELINE)
        unknown = [i for i in args.impl if i not in known]
        if unknown:
            raise SystemExit(f"fusedmlp train: --impl: {stack} has {known}, got {unknown}")


def cmd_train(args: argparse.Namespace, console: Any) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import report as rep
    from .cli import _results, resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    if args.graph != "off" and device != "cuda" and "torch" in args.stack:
        raise SystemExit(
            f"fusedmlp train: --graph {args.graph}: CUDA graphs need --device cuda (the torch "
            "runs; --stack jax scans its steps on any device)"
        )
    overrides = {"steps": args.steps, "lr": args.lr, "seed": args.seed}
    overrides |= {"size": args.size} if args.task == "image" else {"batch": args.batch}
    try:
        cfg = task_config(args.task, device, **overrides)
        cfg.spec  # noqa: B018  (validates the widths)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"fusedmlp train: {exc}") from None
    out_dir = Path(args.out)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )

    def progress(what: str, steps: int) -> Callable[[], None]:
        task = bar.add_task(what, total=steps)
        return lambda: bar.advance(task)

    json_path = out_dir / f"train-{args.task}.json"

    def checkpoint(partial: dict[str, Any]) -> None:
        rep.write_json(_results("train", partial), json_path)
        r = partial["runs"][-1]  # one line per finished run, also where no bar is drawn (a log)
        end = ", ".join(f"{k} {v:.4g}" for k, v in r["final"].items())
        graphed = _stepping(r["stack"], r.get("graph", False))
        console.print(
            f"done {r['stack']}:{r['impl']}{graphed} ({r['chosen']}) {r['precision']}: "
            f"{r['steps']} steps, "
            f"{rep.fmt_time(r['step_time_s'])}/step, warm-up {rep.fmt_time(r['warmup_s'])}, {end}"
        )

    with bar:
        train = run_task(
            args.task,
            cfg,
            stacks=args.stack,
            impls=args.impl,
            precisions=args.precision,
            device=device,
            out_dir=out_dir,
            interpreted_steps=args.interpreted_steps,
            progress=progress,
            checkpoint=checkpoint,
            graph=args.graph,
        )
    results = _results("train", train)
    rep.print_tables(console, train_tables(train))
    rep.write_json(results, json_path)
    png = plot_train(train, out_dir / f"train-{args.task}.png")
    console.print(f"wrote {json_path}, {png}")
    compare = plot_images(train, out_dir)
    if compare is not None:
        console.print(f"wrote {compare}")
    bad = [r for r in train["runs"] if not all(math.isfinite(x) for x in r["loss"])]
    for r in bad:
        console.print(f"[bold red]{r['stack']}:{r['impl']} {r['precision']}: non-finite loss[/]")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import _console

    parser = argparse.ArgumentParser(prog="python -m fusedmlp.bench.train")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return cmd_train(args, _console())


if __name__ == "__main__":
    sys.exit(main())
