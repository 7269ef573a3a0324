"""align-check's self-contained HTML page (plots embedded as PNG, no network), built with the
run report's helpers (`report.py`): a summary, the per-layer table, heatmaps of per-layer
divergence and of router flips, recurrent-state errors, the full-vocabulary KL / TV by
position, the logprob Δ histogram, sampling semantics, the self-test and the golden check."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ring_rl.alignment_checks.report import _PAGE, _atomic_write, _png, _section
from ring_rl.alignment_checks.trace import HEAD_OPS, OP_ORDER


def write_align_report(res, path: str | Path, model_dir: str = "") -> Path:
    """res: an AlignCheckResult. Writes `path` and returns it."""
    body = [_summary(res, model_dir), _table(res), _divergence_heatmap(res), _states(res), _flips(res),
            _vocab(res), _deltas(res), _checks(res)]
    page = _PAGE.replace("{title}", html.escape(f"ring-rl align-check: {res.engine} vs trainer")).replace(
        "{body}", "\n".join(body))
    path = Path(path)
    _atomic_write(path, page)
    return path


def _summary(res, model_dir: str) -> str:
    first = "none above the noise floor" if res.first is None else (
        f"{'after the stack' if res.first.layer is None else f'layer {res.first.layer}'}, {res.first.op} "
        f"(max rel. error {res.first.rel_max:.3g})")
    m = res.metrics
    facts = [("model", model_dir), ("rollout engine", res.engine), ("trainer", "TrainerEngine (DeepSpeed)"),
             ("injection (rollout side)", res.injection or "none"), ("compute dtype", res.compute_dtype),
             ("noise floor", f"{res.noise_floor:.2g}"), ("sampling", ", ".join(f"{k}={v}" for k, v in res.sampling.items())),
             ("response tokens", str(m.get("align/tokens", 0))), ("first divergence", first),
             ("mean |Δ| / max |Δ| / k3", f"{m.get('align/abs_delta_mean', 0):.3g} / {m.get('align/abs_delta_max', 0):.3g} / "
                                         f"{m.get('align/k3', 0):.3g}"),
             ("gate", res.gate.action + (f": {res.gate.describe()}" if res.gate.fired else "")),
             ("verdict", "FAILED: " + "; ".join(res.failed) if res.failed else "passed")]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in res.notes)
    return f"<h1>ring-rl align-check</h1><table class='facts'>{rows}</table>{notes}"


def _table(res) -> str:
    diffs = {(d.layer, d.op): d for d in res.ops}
    cols = [op for op in OP_ORDER if any((layer, op) in diffs for layer in res.layer_kinds)]
    head = "".join(f"<th>{op}</th>" for op in ["layer", "kind"] + cols + ["state", "flips"])

    def cell(d) -> str:
        if d is None:
            return "<td>–</td>"
        first = res.first is not None and (d.layer, d.op) == (res.first.layer, res.first.op)
        style = " style='background:#f5b7b1'" if first else " style='background:#fdebd0'" if not d.rel_max <= res.noise_floor else ""
        return f"<td{style}>{d.rel_max:.2e}</td>"

    rows = []
    for layer, kind in res.layer_kinds.items():
        state = f"{res.states[layer]:.2e}" if layer in res.states else "–"
        flips = f"{res.flips[layer]:.3f}" if layer in res.flips else "–"
        rows.append(f"<tr><td>{layer}</td><td>{kind}</td>" + "".join(cell(diffs.get((layer, op))) for op in cols)
                    + f"<td>{state}</td><td>{flips}</td></tr>")
    tail = " ".join(f"{op}: {diffs[(None, op)].rel_max:.2e}" for op in HEAD_OPS if (None, op) in diffs)
    expl = ("Per layer and op, the largest per-token relative error ‖rollout − trainer‖ / ‖trainer‖ over the "
            "prompt and response positions both engines ran. Shaded: above the noise floor; red: the first "
            "such op in execution order. state: the lightning layer's recurrent state at the end of the "
            "prompt. flips: share of tokens whose MoE expert set differs.")
    return _section("Per-layer divergence", expl,
                    f"<div style='overflow-x:auto'><table style='font-size:12px'><tr>{head}</tr>{''.join(rows)}</table></div>"
                    f"<p>After the stack — {html.escape(tail)}</p>")


def _divergence_heatmap(res) -> str:
    if not res.ops:
        return _section("Divergence heatmap", "No op trace from the rollout engine.", "")
    layers = list(res.layer_kinds) + ["head"]
    ops = [op for op in OP_ORDER + HEAD_OPS if any(d.op == op for d in res.ops)]
    grid = np.full((len(ops), len(layers)), np.nan)
    for d in res.ops:
        grid[ops.index(d.op), layers.index("head" if d.layer is None else d.layer)] = _log10(max(d.rel_max, 1e-12))
    fig = Figure(figsize=(10, 0.45 * len(ops) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="magma_r",
                   vmin=-8, vmax=max(0.0, float(np.nanmax(grid))))
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=8)
    ax.set_yticks(range(len(ops)), ops, fontsize=8)
    ax.set_xlabel("layer", fontsize=9)
    if res.first is not None:
        x = layers.index("head" if res.first.layer is None else res.first.layer)
        ax.add_patch(_box(x, ops.index(res.first.op)))
    fig.colorbar(im, ax=ax, label=f"log10 max rel. error (floor {_log10(res.noise_floor):.1f})")
    expl = "log10 of each op's max relative error; the first op above the noise floor is boxed. Blank: op absent."
    return _section("Divergence heatmap (layer × op)", expl, _png(fig))


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#00a0ff", lw=2.5)


def _states(res) -> str:
    expl = ("Per lightning layer, ‖S_rollout − S_trainer‖ / ‖S_trainer‖ of the recurrent state at the end of the "
            "prompt (rollout: the state its cache held; trainer: rebuilt from its own k, v and decay), worst sequence.")
    if not res.states:
        return _section("Recurrent state at the end of the prompt", expl, "")
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_subplot(1, 1, 1)
    layers = list(res.states)
    ax.plot(range(len(layers)), [_log10(v) for v in res.states.values()], "o", ms=7, color="#4477aa")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.axhline(_log10(res.noise_floor), color="#c0392b", ls="--", lw=1, label="noise floor")
    ax.set_ylabel("log10 rel. error", fontsize=8)
    ax.set_xlabel("lightning layer", fontsize=8)
    ax.legend(fontsize=8)
    return _section("Recurrent state at the end of the prompt", expl, _png(fig))


def _flips(res) -> str:
    expl = ("Share of tokens whose top-k expert set differs between rollout and trainer, per MoE layer and "
            "response position (left), and per layer over all positions (right).")
    if not res.flip_grid:
        return _section("MoE router flips", expl, "")
    fig = Figure(figsize=(11, 0.3 * len(res.flips) + 2))
    ax = fig.add_subplot(1, 2, 1)
    edges = res.flip_edges
    im = ax.imshow(np.ma.masked_invalid(np.array(res.flip_grid, dtype=float)), aspect="auto", interpolation="nearest",
                   cmap="viridis", vmin=0, vmax=max(0.05, float(np.nanmax(res.flip_grid))),
                   extent=(edges[0], edges[-1], len(res.flips) - 0.5, -0.5))
    ax.set_yticks(range(len(res.flips)), [str(x) for x in res.flips], fontsize=8)
    ax.set_xlabel("response position", fontsize=8)
    ax.set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(im, ax=ax, label="flip rate")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar([str(x) for x in res.flips], list(res.flips.values()), color="#228833")
    ax.set_xlabel("MoE layer", fontsize=8)
    ax.set_title("flip rate, all positions", fontsize=9)
    return _section("MoE router flips", expl, _png(fig))


def _vocab(res) -> str:
    v = res.vocab
    expl = ("KL(rollout ‖ trainer) and total variation of the whole temperature-scaled next-token distribution at "
            "each sampled position (not only the sampled token), mean and max by response position.")
    if not v["kl"]:
        return _section("Full-vocabulary divergence", expl, "")
    pos, kl, tv = np.array(v["position"]), np.array(v["kl"]), np.array(v["tv"])
    fig = Figure(figsize=(11, 2.8))
    for n, (vals, name) in enumerate(((kl, "KL"), (tv, "TV"))):
        ax = fig.add_subplot(1, 2, n + 1)
        xs = np.unique(pos)
        for fn, label in ((np.mean, "mean"), (np.max, "max")):
            ax.plot(xs, [_log10(fn(vals[pos == x])) for x in xs], marker="o", ms=3, lw=1.2, label=label)
        ax.set_title(f"log10 {name} by response position", fontsize=9)
        ax.legend(fontsize=8)
    return _section("Full-vocabulary divergence", expl, _png(fig))


def _deltas(res) -> str:
    d = np.array([x for seq in res.deltas for x in seq], dtype=np.float64)
    d = d[np.isfinite(d)]
    expl = "Δ = trainer − rollout logprob of each sampled token."
    if d.size == 0:
        return _section("Sampled-token logprob Δ", expl, "")
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(d, bins=50, color="#4477aa")
    ax.set_title(f"Δ: mean {d.mean():.3g}, max |Δ| {np.abs(d).max():.3g}, bitwise equal {np.mean(d == 0):.1%}",
                 fontsize=9)
    return _section("Sampled-token logprob Δ", expl, _png(fig))


def _checks(res) -> str:
    s, t = res.sampling_check, res.selftest
    rows = [("sampling semantics", s.get("summary", "")),
            ("  rollout max |err| per candidate", _fmt(s.get("rollout", {}).get("max_abs_err", {}))),
            ("  trainer max |err| per candidate", _fmt(s.get("trainer", {}).get("max_abs_err", {}))),
            ("  candidates told apart", ", ".join(s.get("rollout", {}).get("distinguishable", [])) or "none"),
            ("self-test packed vs one-by-one", f"{t['packed_vs_alone']:.2g}"),
            ("self-test padded vs one-by-one", f"{t['padded_vs_alone']:.2g}"),
            ("self-test", f"{'passed' if t['passed'] else 'FAILED'} (tol {t['tol']:g}, {t['sequences']} sequences)"),
            ("trainer trace vs compute_logprobs", f"{res.trace_vs_engine:.2g}")]
    if res.golden is not None:
        g = res.golden
        rows += [("golden", f"{'passed' if g['passed'] else 'FAILED'} (tol {g['tolerance']:g})"),
                 ("  golden problems", "; ".join(g["problems"]) or "none"),
                 ("  versions changed", _fmt(g["versions_changed"]) or "none")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return _section("Checks", "Sampling semantics, the trainer's batching self-test, golden logprobs.",
                    f"<table class='facts'>{table}</table>")


def _log10(x: float) -> float:
    """log10 for plotting on a linear axis (log axes take seconds to lay out); 0 -> -18."""
    return math.log10(max(float(x), 1e-18))


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}: {v:.2g}" if isinstance(v, float) else f"{k}: {v}" for k, v in d.items())
