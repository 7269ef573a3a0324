"""The run report: the per-token writers by hand, and the whole page rendered in headless Chromium."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ring_rl.alignment_checks.gate import check_gate
from ring_rl.alignment_checks.metrics import logprob_mismatch
from ring_rl.alignment_checks.policies import apply_policy
from ring_rl.alignment_checks.report import (load_token_arrays, save_token_arrays, save_worst_tokens,
                                             write_report)
from ring_rl.config import GateRule, RunConfig, save_config

CHROMIUM = "/usr/bin/chromium"


def test_token_arrays_keep_last_steps_and_replace_on_resume(tmp_path):
    r = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    for step in range(1, 6):  # trainer = rollout + step/10 on every token
        save_token_arrays(tmp_path, step, r, [x + step / 10 for x in r], keep_steps=3)
    arr = load_token_arrays(tmp_path)
    assert arr["step"].tolist() == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert arr["seq"].tolist() == [0, 0, 1] * 3 and arr["position"].tolist() == [0, 1, 0] * 3
    np.testing.assert_allclose(arr["delta"], np.repeat([0.3, 0.4, 0.5], 3), rtol=1e-6)  # fp32 of a ~1e-7-exact fp64 gap
    np.testing.assert_allclose(arr["ratio"], np.exp(np.repeat([0.3, 0.4, 0.5], 3)), rtol=1e-6)
    save_token_arrays(tmp_path, 4, r, r, keep_steps=3)  # a resumed run redoes step 4: step 5 is gone
    arr = load_token_arrays(tmp_path)
    assert arr["step"].tolist() == [3, 3, 3, 4, 4, 4] and arr["delta"][3:].tolist() == [0, 0, 0]


def _decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_worst_tokens_by_hand(tmp_path):
    prompt = [torch.tensor([0, 1]), torch.tensor([2])]                 # "ab", "c"
    resp = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]              # "def", "gh"
    a = [torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-2.0, -2.0])]
    b = [torch.tensor([-1.5, -1.0, -0.9]), torch.tensor([-2.0, -4.0])]  # |Δ|: .5 0 .1 | 0 2
    save_worst_tokens(tmp_path, 1, a, b, prompt, resp, _decode, k=3)
    rows = [json.loads(x) for x in (tmp_path / "align_worst.jsonl").read_text().splitlines()]
    assert [(r["seq"], r["position"], r["token"], r["text_before"]) for r in rows] == [
        (1, 1, "h", "cg"), (0, 0, "d", "ab"), (0, 2, "f", "abde")]  # the two Δ = 0 tokens are left out
    assert rows[0]["delta"] == pytest.approx(-2.0) and rows[2]["trainer_lp"] == pytest.approx(-0.9)
    save_worst_tokens(tmp_path, 2, a, a, prompt, resp, _decode, keep=2)  # nothing new; file keeps 2
    assert len((tmp_path / "align_worst.jsonl").read_text().splitlines()) == 2


def test_report_without_optional_files(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "no step has been logged yet" in page and "<img" not in page
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "align/k3": 0.002, "reward/mean": 0.5}) + "\n")
    page = write_report(tmp_path).read_text()
    assert page.count("<img class='plot'") == 2 and "No data for this section" in page
    # a -inf trainer logprob: its Δ is left out of the histograms and counted
    save_token_arrays(tmp_path, 1, [torch.tensor([-1.0, -2.0, -3.0])], [torch.tensor([-1.1, -float("inf"), -3.0])])
    page = write_report(tmp_path).read_text()
    assert page.count("<img class='plot'") == 3 and "2 tokens, 50.0% bitwise equal, 1 non-finite" in page


def _synthetic_run(run_dir: Path, steps: int = 6) -> None:
    """A run of this harness's own pieces on random logprobs whose gap grows with the step."""
    cfg = RunConfig()
    cfg.alignment.policy, cfg.run.dir = "icepop", str(run_dir)
    cfg.alignment.icepop_alpha, cfg.alignment.icepop_beta = 0.8, 1.25  # so that some tokens are masked
    cfg.alignment.gate = rules = [GateRule(metric="k3", threshold=0.004, action="warn"),
                                  GateRule(metric="abs_delta_max", threshold=0.6, action="skip")]
    save_config(cfg, run_dir / "config.yaml")
    g = torch.Generator().manual_seed(0)
    with open(run_dir / "metrics.jsonl", "w") as metrics, open(run_dir / "samples.jsonl", "w") as samples:
        for step in range(1, steps + 1):
            lengths = torch.randint(4, 40, (8,), generator=g).tolist()
            rollout = [-torch.rand(n, generator=g) * 3 - 0.01 for n in lengths]
            # noise grows along the response and over steps; about a quarter of tokens are bitwise equal
            trainer = [r + torch.randn(n, generator=g) * 0.02 * step * (1 + torch.arange(n) / 20)
                       * (torch.rand(n, generator=g) > 0.25) for r, n in zip(rollout, lengths)]
            row = logprob_mismatch(rollout, trainer)
            row.update(apply_policy(cfg.alignment, rollout, trainer).metrics)
            row.update(check_gate(rules, row).as_row())
            row.update({"reward/mean": 0.1 * step + 0.05 * torch.rand(1, generator=g).item(),
                        "reward/accuracy": 0.08 * step, "eval/accuracy": 0.3 if step == steps else None})
            row.update({f"router/flip_layer_{i}": 0.01 * step * (i + 1) * torch.rand(1, generator=g).item()
                        for i in range(4)})
            metrics.write(json.dumps({"step": step, **row}) + "\n")
            prompts = [torch.randint(0, 26, (5,), generator=g) for _ in lengths]
            resp = [torch.randint(0, 26, (n,), generator=g) for n in lengths]
            save_token_arrays(run_dir, step, rollout, trainer)
            save_worst_tokens(run_dir, step, rollout, trainer, prompts, resp, _decode)
            samples.writelines(json.dumps({"step": step, "prompt": _decode(p.tolist()), "response": _decode(x.tolist()),
                                           "gold": "<42>", "reward": float(i % 2)}) + "\n"
                               for i, (p, x) in enumerate(zip(prompts[:3], resp)))


def _chromium(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,2400",
             f"--user-data-dir={run_dir / 'chromium-profile'}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args, (run_dir / "report.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
def test_report_renders_in_chromium(tmp_path):
    _synthetic_run(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    actions = [r["gate/action"] for r in rows]
    assert {"none", "warn", "skip"} <= set(actions), actions  # the gate markers have something to show
    page = write_report(tmp_path).read_text()
    # self-contained: nothing is fetched (no http(s) URL in a src/href, no external script)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert page.count("<img class='plot'") == 4  # mismatch, learning, per-token, routing heatmap
    assert page.count("<mark>") >= 20 and "Gate events" in page and "icepop_beta: 1.25" in page
    assert "k3 &gt; 0.004 → warn; abs_delta_max &gt; 0.6 → skip" in page  # the rules, in the summary

    dom = _chromium(tmp_path, "--dump-dom")
    # set by the page's own script only after every plot decoded; absent if the script failed
    assert 'data-plots="ok 4"' in dom.stdout, (dom.stdout[-800:], dom.stderr[-2000:])
    assert "data-errors" not in dom.stdout
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    out = _chromium(tmp_path, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 50_000, out.stderr[-2000:]  # a blank page is ~10 KB
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
