"""One self-contained HTML report per run (`run_dir/report.html`), and the per-token files it reads.

Plots are matplotlib PNGs embedded as base64: the file opens offline and can be mailed as is.
Every input but metrics.jsonl is optional; a section without its data says so in one line.

Files read from the run dir (a = rollout logprob, b = trainer logprob of a response token):
- metrics.jsonl: one row per step (`align/...`, `policy/...`, `reward/...`, `eval/accuracy`,
  `router/flip_layer_{i}`, `gate/action` and `gate/fired` from GateDecision.as_row()).
- align_tokens.npz (written by `save_token_arrays`): equal-length 1-D arrays, one entry per
  response token of the last `keep_steps` steps:
    step int32, seq int32 (sequence index in its step), position int32 (0 = first response
    token), delta float32 = b − a (taken in fp64, so delta == 0 exactly when a == b bitwise),
    ratio float32 = exp(b − a).
  A step with more than `max_tokens` tokens keeps a uniform random sample of them.
- align_worst.jsonl (written by `save_worst_tokens`): rows {step, seq, position, text_before,
  token, rollout_lp, trainer_lp, delta}, the `keep` largest |delta| of the run so far.
- samples.jsonl {step, prompt, response, gold, reward}; config.yaml.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

REPORT_FILE, TOKENS_FILE, WORST_FILE = "report.html", "align_tokens.npz", "align_worst.jsonl"
TOKEN_KEYS = ("step", "seq", "position", "delta", "ratio")
GATE_COLORS = {"warn": "#e69f00", "skip": "#8e44ad", "abort": "#c0392b"}


# ------------------------------------------------------------------ writers (called by the driver)

def save_token_arrays(run_dir: str | os.PathLike, step: int, rollout_lp: list[torch.Tensor],
                      trainer_lp: list[torch.Tensor], keep_steps: int = 4, max_tokens: int = 500_000) -> Path:
    """Add this step's per-token Δ and ratios to align_tokens.npz, keeping the last `keep_steps`
    steps. Rows of steps >= `step` are replaced (a resumed run redoes them)."""
    lens = np.array([r.numel() for r in rollout_lp], dtype=np.int64)
    if [t.numel() for t in trainer_lp] != lens.tolist():
        raise ValueError("save_token_arrays: rollout and trainer logprobs differ in length")
    starts = np.cumsum(lens) - lens
    new = {"step": np.full(int(lens.sum()), step, np.int32),
           "seq": np.repeat(np.arange(len(lens), dtype=np.int32), lens),
           "position": (np.arange(int(lens.sum())) - np.repeat(starts, lens)).astype(np.int32),
           "delta": (_flat64(trainer_lp) - _flat64(rollout_lp)).numpy()}
    if len(new["step"]) > max_tokens:  # a seeded sample: the same step keeps the same tokens
        pick = np.sort(np.random.default_rng(step).choice(len(new["step"]), max_tokens, replace=False))
        new = {k: v[pick] for k, v in new.items()}
    new["ratio"] = np.exp(new["delta"]).astype(np.float32)
    new["delta"] = new["delta"].astype(np.float32)
    old = load_token_arrays(run_dir)
    if old is not None:
        keep = old["step"] < step
        kept_steps = np.unique(old["step"][keep])[-(keep_steps - 1):] if keep_steps > 1 else np.zeros(0)
        keep &= np.isin(old["step"], kept_steps)
        new = {k: np.concatenate([old[k][keep], new[k]]) for k in TOKEN_KEYS}
    path = Path(run_dir) / TOKENS_FILE
    with open(f"{path}.tmp", "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez_compressed(f, **{k: new[k] for k in TOKEN_KEYS})
    os.replace(f"{path}.tmp", path)
    return path


def _flat64(xs: list[torch.Tensor]) -> torch.Tensor:
    """The per-sequence [R_i] values back to back, fp64 on the CPU (one cat, then one cast)."""
    if not xs:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(list(xs)).detach().cpu().double()


def load_token_arrays(run_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    path = Path(run_dir) / TOKENS_FILE
    if not path.exists():
        return None
    with np.load(path) as z:
        missing = [k for k in TOKEN_KEYS if k not in z]
        if missing:
            raise ValueError(f"{path}: arrays {missing} missing; expected {list(TOKEN_KEYS)}")
        return {k: z[k] for k in TOKEN_KEYS}


def save_worst_tokens(run_dir: str | os.PathLike, step: int, rollout_lp: list[torch.Tensor],
                      trainer_lp: list[torch.Tensor], prompt_ids: list[torch.Tensor],
                      response_ids: list[torch.Tensor], decode: Callable[[list[int]], str],
                      k: int = 20, keep: int = 200, context_chars: int = 160) -> Path:
    """Record this step's `k` largest-|Δ| tokens with the text before them (`decode` is e.g.
    tokenizer.decode) in align_worst.jsonl, which keeps the run's `keep` largest."""
    d = (_flat64(trainer_lp) - _flat64(rollout_lp)).abs()
    lens = np.array([x.numel() for x in rollout_lp], dtype=np.int64)
    seq = np.repeat(np.arange(len(lens)), lens)  # sequence of each token (torch's took 2.5 ms)
    starts = lens.cumsum() - lens
    rows = []
    for t in torch.topk(d, min(k, d.numel())).indices.tolist():  # the step's k largest |Δ|, largest first
        i = int(seq[t])
        j = t - int(starts[i])
        a, b = rollout_lp[i][j].item(), trainer_lp[i][j].item()
        if a == b:
            break  # sorted by |Δ|: only bitwise-equal tokens are left
        ids = response_ids[i].tolist()
        before = decode(prompt_ids[i].tolist() + ids[:j])[-context_chars:]
        rows.append({"step": step, "seq": i, "position": j, "text_before": before,
                     "token": decode([ids[j]]), "rollout_lp": a, "trainer_lp": b, "delta": b - a})
    path = Path(run_dir) / WORST_FILE
    old = [r for r in _read_jsonl(path) if r.get("step", 0) < step]
    merged = sorted(old + rows, key=lambda r: -abs(r["trainer_lp"] - r["rollout_lp"]))[:keep]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in merged)
    os.replace(f"{path}.tmp", path)
    return path


# ------------------------------------------------------------------ the report

def write_report(run_dir: str | os.PathLike) -> Path:
    """Write run_dir/report.html from whatever the run dir holds; returns its path."""
    run = Path(run_dir)
    rows = _read_jsonl(run / "metrics.jsonl")
    cfg_text = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    cfg = (yaml.safe_load(cfg_text) or {}) if cfg_text else {}
    align_cfg = cfg.get("alignment", {}) if isinstance(cfg, dict) else {}
    body = [_summary(run, rows, align_cfg), _mismatch(rows), _reward(rows),
            _tokens(load_token_arrays(run), align_cfg), _router(rows),
            _worst(_read_jsonl(run / WORST_FILE)), _samples(_read_jsonl(run / "samples.jsonl")),
            _section("Config", "The resolved config.yaml of the run (click to fold).",
                     f"<details open><summary>config.yaml</summary><pre>{html.escape(cfg_text)}</pre></details>"
                     if cfg_text else "")]
    page = _PAGE.replace("{title}", html.escape(f"ring-rl report: {run.resolve().name}")).replace("{body}", "\n".join(body))
    out = run / REPORT_FILE
    _atomic_write(out, page)
    return out


def _summary(run: Path, rows: list[dict], align_cfg: dict) -> str:
    events = _gate_events(rows)
    counts = ", ".join(f"{sum(e[1] == a for e in events)} {a}" for a in GATE_COLORS) if events else "never fired"
    last = rows[-1] if rows else {}
    facts = [("run dir", str(run.resolve())), ("steps logged", str(len(rows))),
             ("last step", str(last.get("step", "–"))),
             ("policy", str(align_cfg.get("policy", "?"))), ("mode", str(align_cfg.get("mode", "?"))),
             ("gate rules", "; ".join(f"{g.get('metric')} {g.get('op', '>')} {g.get('threshold')} → {g.get('action')}"
                                      for g in align_cfg.get("gate") or []) or "none"),
             ("gate fired", counts), ("written", datetime.now().strftime("%Y-%m-%d %H:%M"))]
    if align_cfg.get("mode") == "exact":
        facts.append(("exact mode", _exact_verdict(rows)))
    for key in ("align/abs_delta_mean", "align/k3", "align/bitwise_equal_frac", "reward/mean"):
        if isinstance(last.get(key), (int, float)):
            facts.append((f"last {key}", f"{last[key]:.4g}"))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    text = "" if rows else "<p class='note'>metrics.jsonl is missing or empty: no step has been logged yet.</p>"
    return f"<h1>ring-rl run report</h1><table class='facts'>{table}</table>{text}"


def _exact_verdict(rows: list[dict]) -> str:
    broken = [r for r in rows if "exact/first_difference" in r]
    if broken:
        return f"BROKEN at step {broken[0].get('step')}: {broken[0]['exact/first_difference']}"
    checked = [r for r in rows if "align/exact_ok" in r]
    tokens = sum(int(r.get("align/tokens", 0)) for r in checked)
    return (f"bitwise equal at every step: {len(checked)} steps, {tokens} response tokens, "
            "router flips 0" if checked else "no step checked yet")


def _mismatch(rows: list[dict]) -> str:
    keys = [("align/abs_delta_mean", "mean |Δ|"), ("align/abs_delta_max", "max |Δ|"),
            ("align/k3", "k3 (KL estimate)"), ("align/bitwise_equal_frac", "bitwise-equal fraction")]
    events = _gate_events(rows)
    fig = Figure(figsize=(11, 5.6))
    for n, (key, label) in enumerate(keys):
        ax = fig.add_subplot(2, 2, n + 1)
        x, y = _series(rows, key)
        _line(ax, x, y, label)
        for step, action, _ in events:
            ax.axvline(step, color=GATE_COLORS.get(action, "grey"), ls="--", lw=1)
    if events:
        seen = [a for a in GATE_COLORS if any(e[1] == a for e in events)]
        fig.legend(handles=[_legend_line(GATE_COLORS[a], f"gate: {a}") for a in seen], loc="upper center", ncol=3)
    table = "".join(f"<tr><td>{s}</td><td class='gate-{a}'>{a}</td><td>{html.escape(str(f))}</td></tr>" for s, a, f in events)
    gate = (f"<h3>Gate events</h3><table><tr><th>step</th><th>action</th><th>rules that fired</th></tr>{table}</table>"
            if events else "<p class='note'>The gate did not fire on any step.</p>")
    expl = ("Δ = trainer logprob − rollout logprob of each sampled response token, aggregated per step. "
            "k3 = r − 1 − log r (r = exp Δ) estimates KL(rollout ‖ trainer); exact mode aims at a "
            "bitwise-equal fraction of 1. Dashed vertical lines mark steps where the gate fired.")
    return _section("Rollout / trainer mismatch over steps", expl, _png(fig) + gate if rows else "")


def _reward(rows: list[dict]) -> str:
    fig = Figure(figsize=(11, 3))
    ax = fig.add_subplot(1, 2, 1)
    for key in ("reward/mean", "reward/accuracy", "eval/accuracy"):
        _line(ax, *_series(rows, key), "reward and accuracy", label=key)
    _legend(ax)
    ax = fig.add_subplot(1, 2, 2)
    for key in ("policy/masked_frac", "policy/clipped_frac", "policy/weight_mean"):
        _line(ax, *_series(rows, key), "correction policy", label=key)
    _legend(ax)
    expl = ("Left: mean reward and accuracy of the step's rollouts (reward/accuracy) and of the "
            "evaluations (eval/accuracy). Right: the share of tokens the policy masked or clipped, "
            "and the mean token weight (1 = no correction).")
    return _section("Learning and correction", expl, _png(fig) if rows else "")


def _tokens(arr: dict[str, np.ndarray] | None, align_cfg: dict) -> str:
    expl = "Per-token Δ and ratio r = exp Δ of the last few steps kept in align_tokens.npz."
    if arr is None or len(arr["delta"]) == 0:
        return _section("Per-token mismatch", expl, "")
    fin = np.isfinite(arr["delta"])  # a -inf logprob on one side: counted here, left out of the plots
    d, r, pos = arr["delta"][fin].astype(np.float64), arr["ratio"][fin].astype(np.float64), arr["position"][fin]
    if len(d) == 0:
        return _section("Per-token mismatch", expl, f"<p class='note'>All {len(fin)} Δ are non-finite.</p>")
    steps = np.unique(arr["step"])
    expl += (f" Steps {', '.join(map(str, steps))}; {len(d)} tokens, {np.mean(d == 0):.1%} bitwise equal"
             + (f", {int((~fin).sum())} non-finite Δ left out" if not fin.all() else "") + ". "
             "Top: histograms (log counts) with the policy's bounds dashed. Bottom: by position in "
             "the response, where a drifting recurrent state shows as a rising curve.")
    fig = Figure(figsize=(11, 6))
    ax = fig.add_subplot(2, 2, 1)
    ax.hist(d, bins=60, log=True, color="#4477aa")
    ax.set_title("Δ = b − a", fontsize=10)
    ax = fig.add_subplot(2, 2, 2)
    ax.hist(r, bins=60, log=True, color="#228833")
    lo, hi = r.min(), r.max()
    for bound in _bounds(align_cfg):
        if lo <= bound <= hi:
            ax.axvline(bound, color="#c0392b", ls="--", lw=1)
    ax.set_title(f"ratio r = exp Δ (min {lo:.4g}, max {hi:.4g})", fontsize=10)
    edges = np.unique(np.linspace(0, pos.max() + 1, min(int(pos.max()) + 2, 41)).astype(int))
    which = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(edges) - 2)
    have = [b for b in range(len(edges) - 1) if np.any(which == b)]
    x = [edges[b] for b in have]
    ad = np.abs(d)
    ax = fig.add_subplot(2, 2, 3)
    _line(ax, x, [ad[which == b].mean() for b in have], "|Δ| by position", label="mean")
    _line(ax, x, [ad[which == b].max() for b in have], "|Δ| by position", label="max")
    _legend(ax)
    ax.set_xlabel("response position", fontsize=8)
    ax = fig.add_subplot(2, 2, 4)
    _line(ax, x, [np.mean(d[which == b] == 0) for b in have], "bitwise-equal fraction by position")
    ax.set_xlabel("response position", fontsize=8)
    return _section("Per-token mismatch", expl, _png(fig))


def _router(rows: list[dict]) -> str:
    layers = sorted({int(k.rsplit("_", 1)[1]) for row in rows for k in row
                     if k.startswith("router/flip_layer_") and k.rsplit("_", 1)[1].isdigit()})
    expl = ("Per MoE layer, the share of tokens whose top-k expert set differs between rollout "
            "and trainer: one flipped expert choice changes that token's whole MoE output.")
    if not layers:
        return _section("MoE routing flips", expl, "")
    grid = np.array([[_num(row.get(f"router/flip_layer_{i}")) for row in rows] for i in layers])
    steps = [row.get("step", n) for n, row in enumerate(rows)]
    fig = Figure(figsize=(11, 1.6 + 0.25 * len(layers)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(min(steps) - 0.5, max(steps) + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(im, ax=ax, label="flip rate")
    return _section("MoE routing flips", expl, _png(fig))


def _worst(rows: list[dict]) -> str:
    expl = ("The 20 tokens with the largest |Δ| recorded in align_worst.jsonl, shown after the text "
            "that preceded them (the token is highlighted).")
    rows = sorted(rows, key=lambda r: -abs(r["trainer_lp"] - r["rollout_lp"]))[:20]
    cells = "".join(
        f"<tr><td>{r['step']}</td><td class='text'>{html.escape(r['text_before'])}<mark>{html.escape(r['token'])}</mark></td>"
        f"<td>{r['rollout_lp']:.5g}</td><td>{r['trainer_lp']:.5g}</td><td>{r['trainer_lp'] - r['rollout_lp']:+.4g}</td></tr>"
        for r in rows)
    head = "<tr><th>step</th><th>text before ▸ <mark>token</mark></th><th>rollout lp</th><th>trainer lp</th><th>Δ</th></tr>"
    return _section("Worst tokens", expl, f"<table>{head}{cells}</table>" if rows else "")


def _samples(rows: list[dict]) -> str:
    steps = sorted({r.get("step") for r in rows if r.get("step") is not None})[-2:]
    shown = [r for r in rows if r.get("step") in steps][:24]
    cells = "".join(f"<tr><td>{r.get('step')}</td>" + "".join(f"<td class='text'>{html.escape(str(r.get(k, '')))}</td>"
                    for k in ("prompt", "response", "gold")) + f"<td>{_num(r.get('reward')):.3g}</td></tr>" for r in shown)
    head = "<tr><th>step</th><th>prompt</th><th>response</th><th>gold</th><th>reward</th></tr>"
    return _section("Sample generations", "One group of responses per step, from the last two logged steps.",
                    f"<table>{head}{cells}</table>" if shown else "")


# ------------------------------------------------------------------ helpers

def _section(title: str, expl: str, content: str) -> str:
    content = content or "<p class='note'>No data for this section in the run dir.</p>"
    return f"<section><h2>{html.escape(title)}</h2><p class='expl'>{html.escape(expl)}</p>{content}</section>"


def _png(fig: Figure) -> str:
    fig.tight_layout(rect=(0, 0, 1, 0.93) if fig.legends else (0, 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f"<img class='plot' alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _line(ax, x, y, title: str, label: str | None = None) -> None:
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(x):
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.2, label=label)
        pos = [v for v in y if v > 0]
        if len(pos) == len(y) and max(pos) / min(pos) > 50:
            ax.set_yscale("log")  # mismatch spans decades; 0 (exact) keeps the scale linear


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run without these keys has no lines to name
        ax.legend(fontsize=8)


def _legend_line(color: str, label: str):
    from matplotlib.lines import Line2D
    return Line2D([], [], color=color, ls="--", label=label)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], _num(r[key])) for r in rows if key in r and "step" in r]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _gate_events(rows: list[dict]) -> list[tuple[int, str, str]]:
    return [(r.get("step"), r["gate/action"], r.get("gate/fired", "")) for r in rows
            if r.get("gate/action") not in (None, "none")]


def _bounds(align_cfg: dict) -> list[float]:
    p = align_cfg.get("policy")
    if p == "tis":
        return [float(align_cfg.get("tis_cap", 2.0))]
    if p == "mis":
        c = float(align_cfg.get("mis_threshold", 2.0))
        return [1 / c, c]
    if p == "icepop":
        return [float(align_cfg.get("icepop_alpha", 0.5)), float(align_cfg.get("icepop_beta", 2.0))]
    return []


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
    return rows


def _atomic_write(path: Path, text: str) -> None:
    path.with_suffix(".tmp").write_text(text, encoding="utf-8")
    os.replace(path.with_suffix(".tmp"), path)


# `data-plots` is set to "ok N" only when the script ran and every embedded plot decoded: a test
# (or a person's console) reads it to know the page rendered whole.
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1040px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { font-size: 24px; } h2 { font-size: 19px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.expl { color: #555; } .note { color: #888; font-style: italic; }
img.plot { max-width: 100%; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } table.facts th { width: 220px; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 620px; }
mark { background: #ffd54f; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.gate-warn { color: #e69f00; } .gate-skip { color: #8e44ad; } .gate-abort { color: #c0392b; font-weight: bold; }
</style>
<script>
window.addEventListener("error", e => { document.documentElement.dataset.errors = String(e.message); });
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.dataset.plots = bad ? "broken " + bad : "ok " + imgs.length;
});
</script></head>
<body>
{body}
</body></html>"""
