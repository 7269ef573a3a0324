"""Math answer reward: extract the final answer, compare with the gold via math_verify.

Extraction (in-process, linear time, bounded): the last `\\boxed{...}` (balanced braces),
else the last number in the response. Comparison:
  fast path  both sides plain numbers (12, -3.5, 1,234, 3/4): exact rational comparison.
  slow path  anything else goes to math_verify (sympy) in a child process; its verdict per
             (answer, gold) is remembered (timeouts and errors are not).
Why a child process: math_verify's own timeout uses SIGALRM, which only works in the main
thread (not in threaded or async Ray actors), and some short inputs make sympy run for
minutes (`\\boxed{9^{9^{9}}}` did not finish in 60 s; 16 nested braces took 45 s). A process
can be killed at `reward.timeout_s` from any thread; it is restarted on the next slow item.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

from ring_rl.config import RewardConfig

_MAX_NESTING = 8  # ( [ { levels inside \boxed{}; see _balanced
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy machine; not charged to any answer
_CHILD_MEMORY_BYTES = 4 << 30  # a runaway bignum fails with MemoryError, not the host's OOM
_MAX_VERDICTS = 1 << 16  # remembered (answer, gold) verdicts; forgotten all at once when full
_PIPELINE_BYTES = 32 << 10  # unanswered requests written ahead to the worker (a pipe holds 64 KiB)

# An optional sign (not a subtraction: no digit/letter/closing bracket before it), digits with
# optional thousands commas, an optional decimal part or /denominator.
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_BARE_RESPONSE = re.compile(r"\s*-?\d+(?:,\d{3})*(?:\.\d+)?\s*(?:<[^<>]{1,24}>)?\s*")


@dataclass
class RewardInfo:
    reward: float  # what the trainer sees: correct + format_reward * formatted
    correct: bool
    answer: str | None  # the extracted answer (shortened when too long); None if none found
    reason: str  # correct | wrong | no_answer | unclosed_boxed | answer_too_long | too_nested | unparsable | timeout | error
    formatted: bool  # answer boxed, or the whole response a bare number


class RewardFn:
    """`score(responses, golds) -> rewards`; safe from any thread; call close() when done."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self._worker: _VerifyWorker | None = None
        self._lock = threading.Lock()  # one request in flight per worker pipe
        # math_verify's verdict per (answer, gold): a pure function, and the same pairs recur
        # (a group's samples agree, short answers repeat across steps); one pipe round trip
        # and parse each was ~0.35 ms, 25 ms a 256-sample step of the tiny model's outputs.
        self._verdicts: dict[tuple[str, str], tuple[bool, str]] = {}

    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        return [info.reward for info in self.score_with_info(responses, golds)]

    def score_with_info(self, responses: list[str], golds: list[str]) -> list[RewardInfo]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        extracted = [extract_answer(r, self.cfg.max_answer_chars) for r in responses]
        quick = [self._quick(answer, gold) if problem is None else (False, problem)
                 for (answer, _, problem), gold in zip(extracted, golds)]
        # The pairs only math_verify can judge go to the worker together, once each.
        asked = {(ex[0], gold) for ex, gold, verdict in zip(extracted, golds, quick) if verdict is None}
        judged = self._verify_all(sorted(asked)) if asked else {}
        return [self._info(r, ex, verdict or judged[(ex[0], g)])
                for r, g, ex, verdict in zip(responses, golds, extracted, quick)]

    def warmup(self) -> None:
        """Start the math_verify worker now instead of at the first non-numeric answer."""
        with self._lock:
            self._get_worker()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def __enter__(self) -> "RewardFn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.stop()

    def _info(self, response: str, extracted, verdict: tuple[bool, str]) -> RewardInfo:
        answer, kind, _ = extracted
        formatted = kind == "boxed" or (len(response) <= 64 and _BARE_RESPONSE.fullmatch(response) is not None)
        correct, reason = verdict
        reward = float(correct) + (self.cfg.format_reward if formatted else 0.0)
        return RewardInfo(reward, correct, answer, reason, formatted)

    def _quick(self, answer: str, gold: str) -> tuple[bool, str] | None:
        """The verdict without the worker (two plain numbers, or remembered), else None."""
        mine, theirs = plain_number(answer), plain_number(gold)
        if self.cfg.numeric_fast_path and mine is not None and theirs is not None:
            return mine == theirs, "correct" if mine == theirs else "wrong"
        return self._verdicts.get((answer, gold))

    def _verify_all(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[bool, str]]:
        """math_verify's verdicts on `pairs`, pipelined through the worker (_VerifyWorker.
        verify_many); a pair that timed out or failed gets that reason (not remembered: a busy
        machine may time out once) and the ones after it go to a fresh worker."""
        judged = {}
        with self._lock:
            while len(judged) < len(pairs):
                todo = pairs[len(judged):]
                outcomes = self._get_worker().verify_many(todo, self.cfg.timeout_s)
                for pair, outcome in zip(todo, outcomes):
                    judged[pair] = (outcome == "correct", outcome)
                    if outcome not in ("timeout", "error"):
                        if len(self._verdicts) >= _MAX_VERDICTS:
                            self._verdicts.clear()
                        self._verdicts[pair] = judged[pair]
                if outcomes[-1] in ("timeout", "error"):
                    self._worker.stop()  # a killed or dead child; the next items start a fresh one
                    self._worker = None
        return judged

    def _get_worker(self) -> "_VerifyWorker":
        if self._worker is None:
            self._worker = _VerifyWorker()
        return self._worker


def extract_answer(response: str, max_chars: int) -> tuple[str | None, str | None, str | None]:
    """(answer, kind 'boxed'|'number', problem): problem is None when the answer is usable."""
    start = response.rfind("\\boxed")
    if start >= 0:
        i = start + len("\\boxed")
        while i < len(response) and response[i] == " ":
            i += 1
        if i < len(response) and response[i] == "{":
            return _balanced(response, i, max_chars)
    last = None
    for last in _NUMBER.finditer(response):
        pass
    if last is None:
        return None, None, "no_answer"
    text = last.group(0)
    if len(text) > max_chars:
        return text[:32] + "...", "number", "answer_too_long"
    return text, "number", None


def plain_number(text: str) -> Fraction | None:
    """12, -3.5, 1,234 or 3/4 as an exact rational; None for anything else (LaTeX, units)."""
    text = text.strip()
    if "," in text:
        if not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
            return None  # "1,2" is a pair, not one thousand two hundred
        text = text.replace(",", "")
    if len(text) > 4000 or not _PLAIN.fullmatch(text):  # 4000: under Python's int-parsing limit
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _balanced(text: str, open_at: int, max_chars: int) -> tuple[str | None, str, str | None]:
    """Contents of the brace group opening at text[open_at]; escaped \\{ \\} do not count.

    Nesting of ( [ { together is capped: sympy's time grows fast with it (120 nested
    parentheses took 4.5 s, 16 nested braces 45 s), and real answers nest a few levels.
    """
    braces, nest, max_nest, i, end_limit = 0, 0, 0, open_at, open_at + max_chars + 2
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([{":
            nest += 1
            max_nest = max(max_nest, nest)
            braces += c == "{"
        elif c in ")]}":
            nest -= 1
            braces -= c == "}"
            if braces == 0:
                inner = text[open_at + 1:i]
                if max_nest - 1 > _MAX_NESTING:
                    return inner[:32] + "...", "boxed", "too_nested"
                return (inner, "boxed", None) if inner.strip() else (None, "boxed", "no_answer")
        if i >= end_limit:
            return text[open_at + 1:open_at + 33] + "...", "boxed", "answer_too_long"
        i += 1
    return None, "boxed", "unclosed_boxed"


class _VerifyWorker:
    """A child Python process answering one JSON request per line with math_verify."""

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from ring_rl.rl.reward import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._out, self._buf = self.proc.stdout.fileno(), b""
        if self._read_line(_STARTUP_TIMEOUT_S) != {"ready": True}:
            self.stop()
            raise RuntimeError("the math_verify reward worker did not start (see its stderr above)")

    def verify_many(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[str]:
        """Outcomes of `pairs` in order, up to and including the first timeout or error (the
        caller then replaces this worker). Pipelined: requests are written ahead, at most
        _PIPELINE_BYTES of them unanswered -- under the pipe's buffer, so a write never waits
        on a stuck child -- and each reply gets timeout_s from the one before it, the time the
        child spent on that pair. (One round trip per pair woke the child once per pair; on a
        busy 2-core machine 64 distinct LaTeX pairs took 140 ms that way, 100 ms pipelined.)"""
        lines = [(json.dumps({"answer": a, "gold": g}) + "\n").encode() for a, g in pairs]
        outcomes: list[str] = []
        sent = in_flight = 0
        while len(outcomes) < len(lines):
            try:
                while sent < len(lines) and (sent == len(outcomes)
                                             or in_flight + len(lines[sent]) <= _PIPELINE_BYTES):
                    self.proc.stdin.write(lines[sent])
                    in_flight += len(lines[sent])
                    sent += 1
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                return outcomes + ["error"]
            reply = self._read_line(timeout_s)
            outcomes.append(reply.get("outcome", "error") if isinstance(reply, dict) else reply)
            in_flight -= len(lines[len(outcomes) - 1])
            if outcomes[-1] in ("timeout", "error"):
                break
        return outcomes

    def _read_line(self, timeout_s: float):
        """The child's next reply line (parsed), "timeout" or "error" (it died). Lines are
        split here from raw reads: pipelined replies arrive several at a time, and a buffered
        readline would hide the rest from select()."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([self._out], [], [], left)
            if ready:
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    return "error"  # the child died
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _serve() -> None:
    """The child's loop: stdin requests, stdout replies; stray prints go to stderr."""
    import logging
    import resource

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library output must not corrupt the reply stream
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_CHILD_MEMORY_BYTES, _CHILD_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_cache: dict[str, list] = {}

    def parsed(text: str) -> list:
        # parsing_timeout=None: no SIGALRM; the parent enforces the time limit by killing us.
        return parse(f"${text}$", extraction_config=targets, parsing_timeout=None)

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = gold_cache.get(request["gold"])
            if gold is None:
                gold = gold_cache.setdefault(request["gold"], parsed(request["gold"]))
                if len(gold_cache) > 4096:
                    gold_cache.clear()
            answer = parsed(request["answer"])
            if not gold or not answer:
                outcome = "unparsable"
            else:
                ok = verify(gold, answer, timeout_seconds=None)
                outcome = "correct" if ok else "wrong"
        except Exception:  # noqa: BLE001 - MemoryError, RecursionError, sympy bugs: a 0, not a crash
            outcome = "error"
        out.write(json.dumps({"outcome": outcome}) + "\n")
        out.flush()
