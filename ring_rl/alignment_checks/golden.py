"""Golden logprobs: reference values for fixed prompts, to catch a code or version change
that moves them.

`save_golden` writes one JSON file: the model config's hash, the library versions, the
sampling settings and seeds, and per prompt its tokens, the sampled response and both
engines' logprobs (floats written with repr, so fp32 values round-trip exactly).
`compare_golden` then needs
- the same model config (else the file is for another model: an error, not a mismatch);
- the rollout to sample the same tokens from the same seeds, with logprobs within `tol`;
- the trainer's logprobs of the golden tokens (teacher-forced, so independent of
  sampling) within `tol`.
Default tolerances per compute dtype: fp32 1e-4 (legitimate reorderings move fp32
logprobs by ~1e-6; a real change by far more), bf16 5e-2.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from ring_rl.types import RolloutBatch, SamplingParams

FORMAT = "ring-rl-golden/1"
GOLDEN_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Config keys that say nothing about the maths (paths, bookkeeping of who saved it).
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "auto_map"}


class GoldenError(ValueError):
    """A golden file that cannot be compared (wrong format, another model)."""


def config_hash(config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import transformers

    import ring_rl
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "ring_rl": getattr(ring_rl, "__version__", "?")}
    try:
        import deepspeed
        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return out


def save_golden(path: str | os.PathLike, config, engine: str, dtype: torch.dtype, rollout: RolloutBatch,
                trainer_lp: list[torch.Tensor], tol: float) -> Path:
    doc = {
        "format": FORMAT, "config_hash": config_hash(config), "versions": versions(), "engine": engine,
        "dtype": str(dtype).removeprefix("torch."), "tolerance": tol, "sampling": asdict(rollout.sampling),
        "sequences": [{"prompt": p.tolist(), "response": r.tolist(),
                       "rollout_logprobs": [float(x) for x in a], "trainer_logprobs": [float(x) for x in b]}
                      for p, r, a, b in zip(rollout.prompt_ids, rollout.response_ids, rollout.logprobs, trainer_lp)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_golden(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GoldenError(f"{path}: cannot read a golden file ({e})") from None
    if doc.get("format") != FORMAT:
        raise GoldenError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def golden_prompts(doc: dict) -> tuple[list[list[int]], SamplingParams]:
    return [s["prompt"] for s in doc["sequences"]], SamplingParams(**doc["sampling"])


def golden_rollout(doc: dict) -> RolloutBatch:
    """The golden tokens as a RolloutBatch, for teacher-forced trainer logprobs."""
    seqs = doc["sequences"]
    return RolloutBatch(prompt_ids=[torch.tensor(s["prompt"]) for s in seqs],
                        response_ids=[torch.tensor(s["response"], dtype=torch.long) for s in seqs],
                        logprobs=[torch.tensor(s["rollout_logprobs"]) for s in seqs],
                        finish_reasons=["golden"] * len(seqs), weight_version=0,
                        sampling=SamplingParams(**doc["sampling"]))


def compare_golden(doc: dict, config, rollout: RolloutBatch, trainer_lp_of_golden: list[torch.Tensor],
                   tol: float | None = None) -> dict:
    """→ {"passed", "problems": [one line each], "max_abs_rollout", "max_abs_trainer", ...}."""
    tol = float(doc["tolerance"] if tol is None else tol)
    if doc["config_hash"] != config_hash(config):
        raise GoldenError(f"golden file was made for model config {doc['config_hash']}, this model's is "
                          f"{config_hash(config)}: not the same model")
    problems, d_roll, d_train = [], 0.0, 0.0
    for i, s in enumerate(doc["sequences"]):
        want = torch.tensor(s["trainer_logprobs"], dtype=torch.float64)
        got = trainer_lp_of_golden[i].double()
        d = float((got - want).abs().max()) if want.numel() else 0.0
        d_train = max(d_train, d)
        if not d <= tol:
            problems.append(f"sequence {i}: trainer logprobs moved by {d:.3g} > {tol:g}")
        resp = rollout.response_ids[i].tolist()
        if resp != s["response"]:
            t = next((j for j, (a, b) in enumerate(zip(resp, s["response"])) if a != b), min(len(resp), len(s["response"])))
            problems.append(f"sequence {i}: rollout sampled other tokens from response position {t} on "
                            f"({resp[t:t + 3]} vs golden {s['response'][t:t + 3]})")
            continue
        d = float((rollout.logprobs[i].double() - torch.tensor(s["rollout_logprobs"], dtype=torch.float64)).abs().max()) \
            if resp else 0.0
        d_roll = max(d_roll, d)
        if not d <= tol:
            problems.append(f"sequence {i}: rollout logprobs moved by {d:.3g} > {tol:g}")
    now = versions()
    changed = {k: f"{doc['versions'].get(k)} -> {v}" for k, v in now.items() if doc["versions"].get(k) != v}
    return {"passed": not problems, "problems": problems, "tolerance": tol, "max_abs_rollout": d_roll,
            "max_abs_trainer": d_train, "versions_changed": changed}
