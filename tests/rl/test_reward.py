"""The math reward: extraction, tricky equivalences, adversarial outputs, threads."""

import threading
import time

import pytest

from ring_rl.config import RewardConfig
from ring_rl.rl.reward import RewardFn, extract_answer, plain_number

HANG_GUARD_S = 5.0  # generous: these cases take milliseconds; the bound only catches a hang


@pytest.fixture(scope="module")
def reward():
    fn = RewardFn(RewardConfig(timeout_s=5.0))
    yield fn
    fn.close()


def _one(fn, response, gold):
    return fn.score_with_info([response], [gold])[0]


@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{1} then \\boxed {\\{1,2\\}}", "\\{1,2\\}"),  # the last box; escaped braces are text
    ("12-5=7", "7"),  # subtraction is not a negative number
    ("x=-5.", "-5"),
    ("(2)-3", "3"),
    ("answer47", "47"),
    ("total 1,234,567 apples", "1,234,567"),
    ("47<eos>", "47"),
    ("1/4 of it", "1/4"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response, 256)[0] == expected


@pytest.mark.parametrize("text, value", [("1,234", 1234), ("-3.5", -3.5), ("3/4", 0.75), ("1,2", None),
                                          ("\\frac{1}{2}", None), ("1e5", None)])
def test_plain_number(text, value):
    got = plain_number(text)
    assert (got is None and value is None) or float(got) == value


@pytest.mark.parametrize("response, gold, correct", [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", True),   # math_verify path
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{3}}", "0.5", False),
    ("so x = 3", "3", True),  # final number
    ("\\boxed{x = 3}", "3", True),  # math_verify unwraps the assignment
    ("It is 1,234.", "1234", True),
    ("\\boxed{1,234}", "1234", True),
    ("47", "47", True),
    ("47", "48", False),
    ("12+35=47<eos>", "47", True),
    ("-23", "-23", True),
    ("\\boxed{\\sqrt{4}}", "2", True),
    ("\\boxed{\\left(\\frac{((3))}{[1]}\\right)}", "3", True),  # nesting within the cap
])
def test_tricky_answers(reward, response, gold, correct):
    info = _one(reward, response, gold)
    assert info.correct is correct and info.reward == float(correct), info
    assert info.reason == ("correct" if correct else "wrong")


@pytest.mark.parametrize("response, reason", [
    ("I do not know.", "no_answer"),
    ("\\boxed{}", "no_answer"),
    ("\\boxed{\\frac{1}{", "unclosed_boxed"),  # broken LaTeX: a 0, never an exception
    ("\\boxed{" + "{" * 40 + "3" + "}" * 40 + "}", "too_nested"),
    ("7" * 100_000, "answer_too_long"),  # a 10^5-character output
    ("9**99999 = 3" + "7" * 95_419, "answer_too_long"),  # a huge number written out (95,420 digits)
    ("\\boxed{3" + "7" * 95_419 + "}", "answer_too_long"),
    ("\\boxed{" + "x" * 100_000, "answer_too_long"),
    ("\\boxed{" + "(" * 100 + "3" + ")" * 100 + "}", "too_nested"),  # would cost sympy seconds
    ("\\boxed{\\frac{}{}\\sqrt[}{}", "wrong|unparsable"),
])
def test_adversarial_outputs_score_zero_fast(reward, response, reason):
    start = time.perf_counter()
    info = _one(reward, response, "3")
    assert time.perf_counter() - start < HANG_GUARD_S
    assert info.reward == 0.0 and not info.correct and info.reason in reason.split("|"), info


def test_timeout_from_a_thread_then_recovery():
    """9^{9^{9}} keeps sympy busy for minutes; the worker is killed at timeout_s, from a
    non-main thread (where SIGALRM-based timeouts cannot work), and the next answer works."""
    fn = RewardFn(RewardConfig(timeout_s=1.0))
    results = {}

    def work():
        start = time.perf_counter()
        results["slow"] = _one(fn, "\\boxed{9^{9^{9}}}", "3")
        results["seconds"] = time.perf_counter() - start
        results["after"] = _one(fn, "\\boxed{\\frac{6}{4}}", "1.5")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    fn.close()
    assert not thread.is_alive()
    assert results["slow"].reason == "timeout" and results["slow"].reward == 0.0
    assert results["seconds"] < 1.0 + HANG_GUARD_S  # timeout_s plus the kill
    assert results["after"].correct


def test_format_reward_and_batch():
    with RewardFn(RewardConfig(format_reward=0.25)) as fn:
        rewards = fn.score(["\\boxed{47}", "47", "it is 47", "it is 46", "?"], ["47"] * 5)
    assert rewards == [1.25, 1.25, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        RewardFn(RewardConfig()).score(["1", "2"], ["1"])


def test_a_batch_is_pipelined_through_the_worker_and_survives_a_timeout():
    """One batch: the pairs go to the worker written ahead of its replies. A timeout in the
    middle kills that worker; the pairs after it are judged by a fresh one. 1500 distinct
    pairs (~60 KB of requests) exceed the bytes kept in flight, so the window slides."""
    import json

    import ring_rl.rl.reward as reward_mod

    with RewardFn(RewardConfig(timeout_s=1.0)) as fn:
        infos = fn.score_with_info(["\\boxed{\\frac{1}{2}}", "\\boxed{9^{9^{9}}}", "\\boxed{\\frac{6}{4}}",
                                    "\\boxed{x = 3}", "\\boxed{\\frac{1}{2}}"], ["0.5", "3", "1.5", "3", "0.5"])
        assert [i.reason for i in infos] == ["correct", "timeout", "correct", "correct", "correct"]
        n = 1500
        responses = [f"\\boxed{{\\frac{{{2 * i}}}{{2}}}}" for i in range(n)]
        golds = [str(i if i % 7 else i + 1) for i in range(n)]  # every 7th is wrong
        requests = sum(len(json.dumps({"answer": r[7:-1], "gold": g})) + 1 for r, g in zip(responses, golds))
        assert requests > 1.5 * reward_mod._PIPELINE_BYTES
        infos = fn.score_with_info(responses, golds)
    assert [i.correct for i in infos] == [bool(i % 7) for i in range(n)]
    assert {i.reason for i in infos} == {"correct", "wrong"}


def test_verdicts_are_remembered_but_timeouts_are_not(monkeypatch):
    """A repeated (answer, gold) pair is answered without the math_verify worker; a timed-out
    pair is asked again (it may have been the machine, not the answer)."""
    import ring_rl.rl.reward as reward_mod

    fn = RewardFn(RewardConfig(timeout_s=1.0))
    assert _one(fn, "\\boxed{\\frac{1}{2}}", "0.5").correct  # real math_verify, in the child
    assert _one(fn, "\\boxed{9^{9^{9}}}", "3").reason == "timeout"
    fn.close()
    started = []

    def no_worker(self):
        started.append(1)
        raise RuntimeError("no worker in this test")

    monkeypatch.setattr(reward_mod._VerifyWorker, "__init__", no_worker)
    info = _one(fn, "\\boxed{\\frac{1}{2}}", "0.5")
    assert info.correct and info.reason == "correct" and not started
    with pytest.raises(RuntimeError, match="no worker"):
        _one(fn, "\\boxed{9^{9^{9}}}", "3")
    assert started == [1]
