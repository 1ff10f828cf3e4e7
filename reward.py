"""PAUC: the ProactiveVideoQA metric and the MMDuet2 GRPO reward, with their judges.

Role in the pipeline: `grpo.py` calls `mmduet2_reward` on every rollout (training signal,
paper Sec. 4.3.2, Eq. 1-2); after `infer.py` has streamed a benchmark, `python reward.py eval`
scores its predictions with the ProactiveVideoQA metric (what the paper's Table 2 reports).
This file stands alone: it imports nothing of ours and no torch, so its math can be read and
tested without a model. The exact definitions, with worked examples, are in docs/reward.md.

Two things share the name "PAUC" and both rest on `area_ratio` (a step curve of judge scores
over a gold reply span; area under it / best possible area):

1. The metric (`pauc_metric`): replies judged cumulatively on a 3-point scale (S = 2), late
   replies that lower the score pruned, mean over all gold turns, reported x100 at w = 0/0.5/1.
2. The reward (`mmduet2_reward`): r = 3*r_PAUC + 2*r_rep + 0.5*r_in_span + 2*r_pfx, where
   r_PAUC judges each reply alone on a 5-point scale (S = 4) without pruning.

Where we depart from the paper or the released code (each also noted beside its line):

1. r_in_span divides by the turns that fall in no gold span (NO REPLY included), as the released
   code does, not by "all reply entries" as the paper's prose says: the code made the numbers.
2. r_rep counts each reply once; the released code counts some judged replies twice.
3. The metric's "reply duplicate proportion" is our reconstruction: the released evaluation file
   could not be read.
4. The judge instructions are our own wording of the rubric.

Judges: `OpenAIJudge` talks to any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API) with
retries, bounded concurrency and an on-disk cache; `OfflineJudge` is a deterministic word-overlap
judge for tests and the toy world. `LLMClient` (cache + retries + counters + secret redaction) is
reused by data.py. `load_gold` is the project's one loader of a ProactiveVideoQA anno.json (eval,
infer.py and grpo.py): it checks every field the pipeline reads before any model loads.

Run:
    python reward.py eval --gold anno.json --pred preds.jsonl --judge offline
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=EMPTY JUDGE_MODEL=Qwen/Qwen2.5-32B-Instruct \
        python reward.py eval --gold anno.json --pred preds.jsonl --judge openai --json scores.json
    python reward.py eval --gold anno.json --pred runs/preds-sft.jsonl runs/preds-grpo.jsonl \
        --label SFT GRPO --html timeline.html    # two runs, one summary each, one page to compare them
    python -m pytest tests/test_reward.py -q     # the worked examples of docs/reward.md, offline

What `eval` prints, per predictions file (after a "== LABEL: FILE" line when there are several):
a line per gold warning (`gold_warnings`: gold no model can reach, kept and counted); examples, gold
turns and replies; PAUC x100 at w = 0 / 0.5 / 1; the reply duplicate proportion;
the judge's calls, cache hits and failures; extra diagnostics that are not the paper's metric
(replies per example, replies outside every gold span, mean reply delay); the last judge failure.
- --json FILE: that summary; with several --pred, {"gold": GOLD, "runs": {LABEL: summary + "pred"}}.
- --html FILE: one self-contained page (inline SVG, opens offline): the PAUC table of every run,
  then per video the gold reply spans with their answers and each run's replies at their time,
  coloured by the score the metric gave them; no mark is silence.
- Exit status 1, after printing, when more than --max-failures (default 1%) of a file's judge
  calls failed: failed judgments are dropped (their replies count as silence), so the PAUC line
  says NOT A RESULT and --json has "valid": false. Status 130 on Ctrl-C: the judge answers already
  in the cache file are kept, and a rerun asks only the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

import openai
from tqdm import tqdm

SILENCE = "NO REPLY"  # the silence turn; must match mmduet2.SILENCE (this file imports nothing of ours)
METRIC_SCALE = 3  # ProactiveVideoQA judge: 1 incorrect / 2 partial / 3 mostly covered -> S = 2
REWARD_SCALE = 5  # MMDuet2 reward judge: 5 points stored 0..4 -> S = 4 (paper Sec. 4.3.2)
PREFIX_CHARS = 50  # r_pfx: a shared prefix this long marks a "verbose prefix" turn
# one cache for every run on this machine: the key holds the model, so two judges never share an answer
DEFAULT_CACHE = "~/.cache/mmduet2/judge.jsonl"
# a secret as an endpoint may echo it back: "Bearer <token>" (the Authorization header) or an "sk-..." key
SECRET = re.compile(r"(?i)(bearer\s+)[\w.~+/-]+=*|\bsk-[\w-]{8,}")


# ----------------------------------------------------------------------------------------------
# The area function (shared by the metric and the reward)

def area_ratio(points, span_len, max_score, omega=0.5, start_score=0.5):
    """Area under the step curve of judge scores over one reply span, over the best possible area.

    points: [(x, score)], x = reply time - s0 (seconds since the span starts), 0 <= x <= span_len.
    The curve starts at `start_score` at x = 0 and jumps to each score at x * (1 - omega); it is a
    step function, not a linear interpolation. Paper Eq. 1, with the delay compression omega:

        ratio = [x1' * start + sum_p (x'_{p+1} - x'_p) * s_p + (span_len - x'_P) * s_P] / (span_len * S)

    omega = 0 is pure timeliness, omega = 1 pure correctness (the last score / S), omega = 0.5 (the
    headline) gives a correct reply at the very end of the span half of the time credit.

    Worked examples, S = 2, span [10, 20] (span_len 10):
        one reply at t=14 scored 2 -> x=4:  omega 0 -> (4*0.5 + 6*2)/20 = 0.70, 0.5 -> 0.85, 1 -> 1.0
        no reply -> 0.5/2 = 0.25
        t=12 scored 1, t=16 scored 2, omega 0.5 -> x' = 1, 3 -> (1*0.5 + 2*1 + 7*2)/20 = 0.825
    With S = 4 a reply scored 0 at x=2 gives (1*0.5 + 9*0)/40 = 0.0125 < 0.125 (silence): by design.
    """
    if span_len <= 0:  # the area is divided by span_len: a point span would divide by zero
        raise ValueError(f"area_ratio: span_len must be > 0 (a reply span needs s1 > s0), got {span_len}")
    if not points:
        return start_score / max_score  # silence keeps the start score over the whole span
    pts = sorted(points)  # the curve is walked left to right, whatever order the caller used
    # a point outside the span would give a step of negative width: callers keep in-span replies only
    if pts[0][0] < 0 or pts[-1][0] > span_len:
        raise ValueError(f"area_ratio: every x must lie in [0, {span_len}], got {[x for x, _ in pts]}")
    # Eq. 1: the curve starts at 0.5, not 0, so a reply scored 0 pulls it below silence (a wrong
    # answer must cost more than saying nothing)
    area, prev_x, height = 0.0, 0.0, start_score
    for x, score in pts:
        x *= 1 - omega  # compress the delay: with omega > 0 a late reply still earns some width
        area += (x - prev_x) * height  # the step before this reply keeps the previous height
        prev_x, height = x, score
    area += (span_len - prev_x) * height  # the last score holds until the span ends
    return area / (span_len * max_score)


# ----------------------------------------------------------------------------------------------
# Judges: one interface, two implementations

class Judge(Protocol):
    """What the metric and the reward need from a judge (both judges below implement it).

    score: how well `pred` covers `gold` for `question`, on a `scale`-point rubric (3 or 5),
        returned as the judge's digit - 1 (so 0..scale-1), or None when the call failed.
    repeats: whether all information in `new` is already in `previous`, or None on failure.
    A None is dropped by the callers (and counted in `failures`), never read as a score of 0.
    """
    calls: int
    cache_hits: int
    failures: int

    def score(self, question: str, gold: str, pred: str, scale: int) -> int | None: ...
    def repeats(self, previous: list[str], new: str) -> bool | None: ...


class JudgeError(RuntimeError):
    """The endpoint cannot be used at all (unreachable, bad key, unknown model): stop the run."""


def parse_score(answer, scale):
    """The judge's digit - 1, or None. Strict: the answer is exactly one number, on the 1..scale scale, and
    it comes first (the rubric asks for the digit alone: no prefix). Words may follow it, another number
    may not: "1 3" or "3/5" is two scores, not the first of them, and "2.5" is none on the scale.

    Examples (scale 3): "3" -> 2, "2. Partially" -> 1, "0" -> None, "35" -> None, "Score: 3" -> None,
    "1 3" -> None, "3\n1" -> None, "3/5" -> None, "2.5" -> None.
    """
    m = re.fullmatch(r"\s*(\d+)\D*", answer or "")  # \D*: nothing after the number may be a digit
    return int(m.group(1)) - 1 if m and 1 <= int(m.group(1)) <= scale else None


def parse_yes_no(answer):
    """True for "yes...", False for "no...", None for anything else ("Nope", "I think yes")."""
    m = re.match(r"\s*(yes|no)\b", answer or "", re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def completion_text(body):
    """The answer in the JSON body of a chat completion, or None when the body is not one.

    '{"choices": [{"message": {"content": "3"}}]}' -> "3"; a null content -> "" (an empty answer is an
    answer: bad, not lost); an HTML page, '{}', '{"choices": []}', a null message -> None.
    """
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):  # not JSON / no such key or index / a null on the way
        return None
    if content is None or isinstance(content, str):
        return content or ""  # an empty answer is still an answer (a bad one): parsed, not retried
    return None  # a list or an object where the text should be: not a chat completion we understand


class LLMClient:
    """One chat model behind an OpenAI-compatible endpoint: `ask(instruction, text) -> str | None`.

    - Cache: an append-only JSONL file keyed by sha256(model, instruction, text), so a re-run asks
      nothing twice and an interrupted run loses nothing. Answers are cached as returned, secrets
      redacted; with `accept`, only the answers it accepts: a judge answer its parser rejects is a
      failed call, and a failed call is never cached, so once the judge is fixed a rerun asks it again.
    - Retries: timeouts, 408/409/429, 5xx, an HTTP 200 whose body is no chat completion and an
      answer `accept` rejects are retried with exponential backoff, then the call is a failure
      (None, counted). Other 4xx (e.g. a too-long input) fail at once.
    - Fatal: an unreachable endpoint (after the retries), a bad key or an unknown model raise one
      JudgeError; every later ask raises it at once, so a thread pool stops without a storm.
    - Counters: `calls` (questions sent to the endpoint, retries not counted), `cache_hits`,
      `failures` (calls with no usable answer, parse failures included), `last_error`.
    - No secret leaves it: some proxies echo the Authorization header in their error bodies, so
      every answer, error message and JudgeError is redacted (the key, bearer tokens, "sk-..." keys).
    Thread-safe: the cache, the file and the counters are guarded by one lock; requests run
    outside it, up to `max_workers` at a time when a caller uses `run_all`.
    """

    def __init__(self, model=None, base_url=None, api_key=None, cache_path=DEFAULT_CACHE,
                 max_workers=8, timeout=60.0, retries=3, backoff=1.0, max_tokens=1024):
        self.model = model or os.environ.get("JUDGE_MODEL")
        if not self.model:  # the endpoint needs a model name, and the cache key holds it
            raise JudgeError("no judge model: pass --model or set JUDGE_MODEL")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        # a local server (vLLM, SGLang) takes any key, but the client refuses an empty one
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        # max_retries=0: the retries are ours (below), so they are bounded, counted and testable
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.max_workers, self.retries, self.backoff, self.max_tokens = max_workers, retries, backoff, max_tokens
        self.calls = self.cache_hits = self.failures = 0
        self.last_error = None
        self._fatal = None  # set once the endpoint is known to be unusable
        self._lock = threading.Lock()
        self.cache_path = Path(cache_path).expanduser() if cache_path else None  # None or "": no cache file
        self._cache = {}  # key -> answer, every answer this file has ever held (runs append, never rewrite)
        if self.cache_path and self.cache_path.exists():
            text = self.cache_path.read_text()
            for line in text.splitlines():  # a key written twice (two runs at once): the last one wins
                try:
                    row = json.loads(line)
                    self._cache[row["key"]] = row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by an interrupted run: that call is simply asked again
            if text and not text.endswith("\n"):
                with self.cache_path.open("a") as f:
                    f.write("\n")  # close the cut line so the next append starts clean

    def ask(self, instruction, text, accept=None):
        """The model's answer to `text` under the system `instruction`, or None if the call failed.

        accept(answer) -> bool: whether an answer is usable (e.g. a score on the scale); one it rejects is
        a failed attempt, retried, then a failed call, and never cached. None: every answer is usable.
        """
        # at temperature 0 these three decide the answer; json.dumps of a list keeps them apart
        # ("a" + "bc" and "ab" + "c" give different keys)
        key = hashlib.sha256(json.dumps([self.model, instruction, text]).encode()).hexdigest()
        with self._lock:
            if self._fatal:  # another thread found the endpoint unusable: do not send one more request
                raise JudgeError(self._fatal)
            # a cached answer `accept` rejects (written before answers were checked) is asked again
            if key in self._cache and (accept is None or accept(self._cache[key])):
                self.cache_hits += 1
                return self._cache[key]
            self.calls += 1
        answer = self._request(instruction, text, accept)  # outside the lock: requests run concurrently
        with self._lock:
            if answer is None:
                return None  # _request has counted the failure; nothing cached, so a re-run asks again
            self._cache[key] = answer
            if self.cache_path:  # written at once, so Ctrl-C a second later loses nothing
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as f:  # one line per answer, flushed on close
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")
        return answer

    def _request(self, instruction, text, accept=None):
        """One question to the endpoint, with our retries: the answer text (redacted), or None (failure counted)."""
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
        # error: what the last attempt got; fatal: whether it means the endpoint itself is unusable
        error, fatal = None, False
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))  # 1x, 2x, 4x ... the base backoff
                # (exponential: an overloaded server answering 429 gets room to recover)
            try:
                # the raw body, parsed by us: the client would accept an HTML page or a body without
                # `choices` and fail later, in a worker thread, with an AttributeError.
                # temperature 0: the same question gets the same answer, which is what makes caching sound
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=0.0, max_tokens=self.max_tokens)
                answer = completion_text(raw.http_response.text)
                if answer is not None:
                    answer = self._redact(answer)  # before it is checked, cached or printed
                    if accept is None or accept(answer):
                        return answer
                    # answered, but not in the format asked for ("1 3", "3/5"): retried like a 5xx (a
                    # server may answer otherwise the next time), then a failed call
                    error, fatal = f"unusable judge answer {answer[:60]!r}", False
                    continue
                # HTTP 200 but garbage (a proxy's error page, a cut body): retried like a 5xx
                body = self._redact(raw.http_response.text)[:200]
                error, fatal = f"HTTP 200 but not a chat completion: {body!r}", False
            except openai.APITimeoutError:  # before APIConnectionError: it is a subclass of it
                error, fatal = "timed out", False  # a slow server is alive: retried, then one failed call
            except openai.APIConnectionError as e:
                # fatal only if the last attempt is unreachable too (a later timeout or 5xx resets it)
                error, fatal = f"unreachable ({self._redact(str(e))})", True
            except openai.APIStatusError as e:
                # redact, then cut: a cut first could leave half a key that no longer matches
                error, fatal = f"HTTP {e.status_code}: {self._redact(str(e))[:200]}", False
                if e.status_code in (401, 403, 404):  # bad key, forbidden, unknown model: a setup error
                    self._stop(error)
                if e.status_code not in (408, 409, 429) and e.status_code < 500:
                    break  # other 4xx (e.g. input too long) will not get better by asking again
        if fatal:  # still unreachable after every retry: no later call will do better
            self._stop(error)
        self.count_failure(error)
        return None

    def _stop(self, error):
        """Mark the endpoint unusable for every thread, and raise: no later ask sends a request."""
        with self._lock:
            self._fatal = self._redact(
                f"judge endpoint {self.base_url} (model {self.model}): {error}; "
                "check the server, --base-url / OPENAI_BASE_URL, the key and --model / JUDGE_MODEL")
        raise JudgeError(self._fatal)

    def count_failure(self, error):
        """Count one call that produced no usable answer."""
        with self._lock:
            self.failures += 1
            self.last_error = self._redact(f"{self.base_url}: {error}")  # which endpoint, when several are in use

    @property
    def cached(self):
        """How many answers the cache holds (this run's and earlier runs')."""
        return len(self._cache)

    def _redact(self, text):
        """`text` with the API key and anything shaped like a secret replaced by "[redacted]"."""
        key = self.client.api_key
        if len(key) >= 8:  # a placeholder such as "EMPTY" is no secret, and replacing it would garble words
            text = text.replace(key, "[redacted]")
        # SECRET catches what the exact key misses: another key a proxy echoes back, or a bearer token
        return SECRET.sub(lambda m: (m.group(1) or "") + "[redacted]", text)  # keeps the word "Bearer"


# our own wording of the rubrics in docs/reward.md; the scale-3 one is the metric's, scale-5 the reward's
SCORE_INSTRUCTIONS = {
    3: ("You grade a video assistant's answer against a reference answer to the same question about "
        "a video. Rate how much of the reference's information the answer states correctly: "
        "1 = incorrect or unrelated, 2 = partially covered, 3 = mostly covered. "
        "Reply with the single digit only."),
    5: ("You grade a video assistant's answer against a reference answer to the same question about "
        "a video. Rate how much of the reference's information the answer states correctly: "
        "1 = incorrect or unrelated, 2 = a small part, 3 = about half, 4 = most of it, "
        "5 = all of it. Reply with the single digit only."),
}
REPEAT_INSTRUCTION = (
    "A video assistant sent some earlier replies and then a new reply. Is all the information in the "
    "new reply already covered by the earlier replies? Answer with yes or no only.")


class OpenAIJudge(LLMClient):
    """The LLM judge: our rubric prompts on top of LLMClient, answers parsed strictly.

    An answer the parser rejects is a failed call (None), like a timeout: retried, then dropped and
    counted, never read as 0 and never cached.
    """

    def __init__(self, *args, max_tokens=16, **kwargs):  # a digit or yes/no needs a few tokens
        super().__init__(*args, max_tokens=max_tokens, **kwargs)

    def score(self, question, gold, pred, scale):
        if scale not in SCORE_INSTRUCTIONS:  # only two rubrics exist: the metric's (3) and the reward's (5)
            raise ValueError(f"judge scale must be 3 or 5, got {scale}")
        # the question goes along: "Red." is a full answer to "what colour?" and half of "what appeared?"
        answer = self.ask(SCORE_INSTRUCTIONS[scale],
                          f"Question: {question}\nReference answer: {gold}\nAssistant's answer: {pred}",
                          accept=lambda a: parse_score(a, scale) is not None)
        return None if answer is None else parse_score(answer, scale)

    def repeats(self, previous, new):
        earlier = "\n".join(f"- {p}" for p in previous)  # one reply a line: the judge sees where each ends
        answer = self.ask(REPEAT_INSTRUCTION, f"Earlier replies:\n{earlier}\nNew reply: {new}",
                          accept=lambda a: parse_yes_no(a) is not None)
        return None if answer is None else parse_yes_no(answer)


# words that carry no attribute: in "A red circle appeared on the left." only red/circle/left count
STOPWORDS = frozenset("""a an the this that these those it its there here is are was were be been
being has have had do does did on in at of to into onto from by for with and or as now just then
appear appears appeared appearing shown seen visible screen video""".split())


def content_words(text):
    """Lower-cased alphanumeric words minus STOPWORDS: "A red circle appeared on the left." -> {red, circle, left}."""
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOPWORDS


class OfflineJudge:
    """A deterministic judge without network, for tests and the toy world.

    score measures content-word overlap between prediction and gold as an F1 (both a missing
    attribute and an extra, hedged one cost points: a recall-only judge would teach the toy GRPO
    policy to list every colour), mapped to the scale and rounded: round(F1 * (scale - 1)).
        gold "A red circle appeared on the left."  (red, circle, left)
        "A red circle on the left."   -> F1 1.0 -> 4 on scale 5, 2 on scale 3
        "A red square on the left."   -> F1 2/3 -> 3 on scale 5, 1 on scale 3
        "A blue square on the right." -> F1 0   -> 0
    repeats: an exact repeat, or the new reply's content words all appear in ONE earlier reply
    (not in their union: a new event "red circle on the right" after "red square on the right"
    and "blue circle on the left" is news, though every word was said before). A reply with no
    content word ("It appeared.") adds nothing, so it repeats whatever came before it.
    """
    max_workers = 1  # cheap: run_all runs it inline

    def __init__(self):
        self.calls = self.cache_hits = self.failures = 0  # same names as OpenAIJudge, for the CLI
        self._lock = threading.Lock()  # thread-safe like OpenAIJudge: a caller may share it between threads

    def _count(self):
        with self._lock:
            self.calls += 1

    def score(self, question, gold, pred, scale):
        if scale not in (3, 5):
            raise ValueError(f"judge scale must be 3 or 5, got {scale}")
        self._count()
        g, p = content_words(gold), content_words(pred)
        if not g:  # a gold with no content word ("Yes."): compare the plain words instead
            g, p = set(re.findall(r"[a-z0-9]+", gold.lower())), set(re.findall(r"[a-z0-9]+", pred.lower()))
        hits = len(g & p)
        # F1 = 2|g & p| / (|g| + |p|): recall (missing words) and precision (extra words) in one number;
        # `if hits` also guards the empty/empty case, which would divide by zero
        f1 = 2 * hits / (len(g) + len(p)) if hits else 0.0
        return int(f1 * (scale - 1) + 0.5)  # round half up onto 0..scale-1 (round() would round 0.5 to even)

    def repeats(self, previous, new):
        self._count()
        words = content_words(new)
        # <= is "subset of": each earlier reply is tested alone, never the union of them (see above)
        return any(new.strip() == p.strip() or words <= content_words(p) for p in previous)


def run_all(judge, fn, jobs):
    """[fn(*job) for job in jobs], concurrently up to judge.max_workers, in job order, with a progress bar.

    The workers are daemon threads, not a ThreadPoolExecutor: Python joins an executor's threads
    at exit, so after Ctrl-C it would wait for every request in flight (up to the timeout). Here
    the caller can leave at once: on Ctrl-C or a JudgeError no worker starts another job, and a
    request in flight is abandoned (its answer, if it comes first, still reaches the cache).
    """
    workers = min(getattr(judge, "max_workers", 1), len(jobs))  # never more threads than jobs
    if workers <= 1:
        return [fn(*job) for job in jobs]  # the offline judge, or a single job: no threads at all
    # todo: job indices waiting for a worker; done: one message per finished job (None, or its error)
    todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for i in range(len(jobs)):
        todo.put(i)
    results = [None] * len(jobs)  # filled by index, so the order is the jobs' whatever finishes first

    def work():
        while not stop.is_set():  # checked between jobs: after Ctrl-C or an error, no new request starts
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(*jobs[i])
                done.put(None)
            except Exception as e:  # a JudgeError: the caller re-raises it
                done.put(e)  # handed to the main thread: an exception in a thread would only be printed

    for _ in range(workers):
        threading.Thread(target=work, daemon=True).start()
    try:
        # `with`: an interrupted bar is erased before the caller prints; disable=None: a terminal only
        with tqdm(total=len(jobs), desc="judge", disable=None, leave=False) as bar:
            for _ in jobs:  # exactly one message per job, so this loop ends when the last one is in
                while True:  # short waits: a Ctrl-C that lands just before a wait begins cannot end
                    try:     # that wait, so it is seen at the next one (a wait without a timeout
                        error = done.get(timeout=0.2)  # would last until a slow request returns)
                        break
                    except queue.Empty:
                        pass
                if error is not None:
                    raise error
                bar.update()
    finally:
        stop.set()  # on every way out: normal end, an error, or Ctrl-C
    return results


# ----------------------------------------------------------------------------------------------
# 1. The ProactiveVideoQA metric (evaluation)

def _is_seconds(v):
    """A finite number that is not a bool (json reads NaN and Infinity; True is an int to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_id(v):
    """A usable question_id: a string or an int (hashable; a bool would collide with 0 and 1)."""
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _span(turn, key, where):
    """[start, end] of a gold turn as floats: reply_timespan 0 <= s0 < s1, related_timespan r0 <= r1."""
    span = turn.get(key) if isinstance(turn, dict) else None
    # a NaN bound would make every "s0 <= t <= s1" false: the turn would silently score as silence
    if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(map(_is_seconds, span))):
        raise ValueError(f"{where}: '{key}' must be [start, end] in seconds (finite numbers), got {span!r}")
    a, b = float(span[0]), float(span[1])
    if key == "reply_timespan" and a < 0:  # no turn is ever spoken before t = 0
        raise ValueError(f"{where}: reply_timespan {list(span)} starts before the video (s0 < 0)")
    # the reply span is area_ratio's width: it must be positive. A related span only gives r1 (for
    # pruning), and an instant event [r, r] is a fair description of one
    if key == "reply_timespan" and b <= a:
        raise ValueError(f"{where}: reply_timespan {list(span)} has s1 <= s0 (a span needs positive length)")
    if b < a:
        raise ValueError(f"{where}: {key} {list(span)} ends before it starts")
    return a, b


def _replies(preds):
    """(time, text) replies in time order: stripped, NO REPLY left out (silence is not a reply)."""
    out = [(float(t), text.strip()) for t, text in preds if text.strip() != SILENCE]
    return sorted(out, key=lambda r: r[0])  # stable: replies at the same time keep their order


def _question(example, turn):
    # a dialogue with several questions names each gold turn's question; else it is the first user turn
    return turn.get("question") or example["conversation"][0]["content"]


def prune_late(points, r1):
    """Late-reply pruning: drop scores after the event ends (t > r1) that are below the last on-time one.

    points: [(time, score)] in time order. Only applies when there is more than one score.
    `last` = the most recent score at t <= r1, starting at 0. Example, r1 = 15:
        [(12, 2), (17, 1), (18, 2)] -> [(12, 2), (18, 2)]   (the 1 at t=17 came late and lowered the curve)
    """
    if len(points) <= 1:
        return points  # the rule's "more than one score" (the loop would keep a lone point too)
    kept, last = [], 0  # `last` starts at 0: before any on-time reply, no late score is below it
    for t, s in points:
        if t <= r1:
            last = s  # on time: always kept, and it sets the bar for later replies
            kept.append((t, s))
        elif s >= last:
            kept.append((t, s))  # late, but it does not lower the score
    return kept


def metric_turns(examples, predictions, judge):
    """Judge every gold turn once for the metric: [(points, span_len, judged)], one per gold turn in
    example order, points = [(x, score)] after late-reply pruning (what area_ratio takes, S = 2).

    Replies are judged cumulatively on the 3-point scale (docs/reward.md, metric steps 1-3).
    judged = {(time, text): (score, on_curve)} for each reply judged in this span (exact repeats
    are absent; score None: the call failed; on_curve False: pruned), for the timeline page.
    """
    # Two passes: first every judge input is written down, then all are judged at once. Cumulative
    # judging needs only the earlier TEXTS, never their scores, so the inputs are known up front
    # and run_all can send them concurrently.
    jobs, turns = [], []  # judge requests; per gold turn (s0, s1, r1, [(time, text, job index)])
    for i, ex in enumerate(examples):
        qid = ex["question_id"]
        if qid not in predictions:
            raise ValueError(f"no prediction for question_id {qid!r} (example {i})")
        replies = _replies(predictions[qid])  # in time order, NO REPLY left out
        for j, g in enumerate(ex["answer"]):
            where = f"example {i} ({qid}) answer {j}"
            s0, s1 = _span(g, "reply_timespan", where)
            r1 = _span(g, "related_timespan", where)[1]  # the event's end: later replies count as late
            kept, requests = [], []
            for t, text in replies:
                # spans may overlap, so one reply can be judged for two gold turns; an exact repeat
                # adds nothing to the concatenation, so it is not judged again
                if not s0 <= t <= s1 or text in kept:  # inclusive span; exact repeats are not re-judged
                    continue
                kept.append(text)
                requests.append((t, text, len(jobs)))
                # cumulative judging: what the model has said in this span SO FAR, space-joined, is
                # compared with the gold, so two partial replies can add up to a full answer
                jobs.append((_question(ex, g), g["content"], " ".join(kept), METRIC_SCALE))
            turns.append((s0, s1, r1, requests))
    scores = run_all(judge, judge.score, jobs)  # the judge's digit - 1 (0..2), or None
    out = []
    for s0, s1, r1, requests in turns:
        points = [(t, scores[k]) for t, _, k in requests if scores[k] is not None]  # failures dropped, not 0
        on_curve = prune_late(points, r1)  # pruning compares times with r1, so it runs before the shift
        judged = {(t, text): (scores[k], (t, scores[k]) in on_curve) for t, text, k in requests}
        out.append(([(t - s0, s) for t, s in on_curve], s1 - s0, judged))  # x = seconds since s0
    return out


def reply_notes(examples, predictions, turns):
    """What the metric made of each reply: {question_id: [(time, text, best, note)]}, for the timeline.

    turns: metric_turns' output for these examples. best: the highest score (0..2) the reply holds
    on some gold turn's curve, else None. note: for each gold turn whose span holds the reply, its
    score, or that it was pruned, failed or an exact repeat; "outside every gold span" for none.
    """
    # turns has one record per gold turn in the same order as the loop below walks them, so the
    # records are consumed one by one instead of being matched again by time
    out, records = {}, iter(turns)
    for ex in examples:
        spans = [(j, *g["reply_timespan"], next(records)[2]) for j, g in enumerate(ex["answer"])]
        marks = []
        for t, text in _replies(predictions[ex["question_id"]]):
            notes, best = [], None
            for j, s0, s1, judged in spans:
                if not s0 <= t <= s1:
                    continue
                score, on_curve = judged.get((t, text), (None, None))
                if (t, text) not in judged:  # in the span but never judged: metric_turns skipped it
                    note = "an exact repeat, not judged again"
                elif score is None:
                    note = "the judge call failed: dropped, as if silent"
                elif not on_curve:
                    note = f"score {score} of {METRIC_SCALE - 1}, pruned (late, below the on-time score)"
                else:
                    note = f"score {score} of {METRIC_SCALE - 1}"
                    best = score if best is None else max(best, score)
                notes.append(f"gold {j + 1}: {note}")
            marks.append((t, text, best, "; ".join(notes) or "outside every gold span"))
        out[ex["question_id"]] = marks
    return out


def pauc_metric(examples, predictions, judge, omega=0.5):
    """The ProactiveVideoQA PAUC: mean over ALL gold turns of all examples of area_ratio(S=2).

    examples: parsed anno.json entries; predictions: {question_id: [(time, text), ...]} replies.
    Turn-weighted, not example-weighted; a turn without a score counts 0.5/2 = 0.25; replies
    outside every span are not penalised. Example: one example, gold spans [10, 20] (r1 = 19) and
    [30, 40]; one reply at t=14 judged "3" (stored 2) -> turn 1 = 0.85 (omega 0.5), turn 2 = 0.25,
    PAUC = (0.85 + 0.25) / 2 = 0.55 (x100 = 55.0).
    """
    turns = metric_turns(examples, predictions, judge)
    if not turns:  # a mean over no turns: 0/0, not a score of 0
        raise ValueError("pauc_metric: the gold examples have no answer turns")
    # one mean over every gold turn: a video with four gold turns weighs four times one with a single turn
    return sum(area_ratio(p, span_len, METRIC_SCALE - 1, omega) for p, span_len, _ in turns) / len(turns)


def duplicate_proportion(predictions, judge):
    """Reply duplicate proportion (OUR RECONSTRUCTION: the released evaluation file was unreadable).

    Among each example's replies in time order (NO REPLY excluded), the share that repeat: an
    exact repeat of an earlier reply (no judge call), or judged "all information already covered
    by the earlier replies". A first reply repeats nothing. Failed judge calls are dropped.
    Example: replies "A red circle.", "A red circle.", "A blue square." with a judge that says no
    -> 1 repeat out of 3 -> 0.333.
    """
    # As in metric_turns, the judge inputs are known up front (the earlier texts), so they are all
    # collected first and judged concurrently; each reply keeps a slot for its verdict.
    verdicts, jobs, slots = [], [], []  # one verdict per reply; judge jobs fill the None slots
    for preds in predictions.values():  # per example: a reply can only repeat its own video's replies
        texts = [text for _, text in _replies(preds)]
        for i, text in enumerate(texts):
            earlier = list(dict.fromkeys(texts[:i]))  # unique, in order: a shorter prompt, same meaning
            if text in earlier or not earlier:
                verdicts.append(bool(earlier))  # exact repeat -> True; first reply -> False
            else:
                slots.append(len(verdicts))
                verdicts.append(None)
                jobs.append((earlier, text))
    for slot, verdict in zip(slots, run_all(judge, judge.repeats, jobs)):
        verdicts[slot] = verdict  # None again if the call failed: dropped just below
    counted = [v for v in verdicts if v is not None]  # failed calls dropped from both counts
    return sum(counted) / len(counted) if counted else 0.0


def reply_delays(turns, answers):
    """Seconds from each gold reply span's start to the first reply inside it, for the spans that got one.

    turns: (time, text) assistant turns, NO REPLY ones included or not; answers: gold turns with reply_timespan.
    Example: span [10, 20], replies at 13 and 16 -> [3.0]; span [30, 40] with no reply in it -> nothing.
    """
    replies = _replies(turns)  # sorted by time, so the first match below is the earliest reply
    delays = []
    for j, g in enumerate(answers):
        s0, s1 = _span(g, "reply_timespan", f"gold turn {j}")
        first = next((t for t, _ in replies if s0 <= t <= s1), None)
        if first is not None:
            delays.append(first - s0)
    return delays


def reply_stats(examples, predictions):
    """Extra diagnostics, NOT part of the paper's metric: reply count, replies outside every gold span
    (what r_in_span punishes; paper Table 6) and mean reply delay.

    delay of a gold turn = time of its first in-span reply - s0; averaged over the gold turns that
    got one (None when none did). Example: span [10, 20], replies at 13, 16 and 25 -> delay 3.0,
    1 reply outside.
    """
    n_replies, outside, delays = 0, 0, []
    for ex in examples:
        replies = _replies(predictions[ex["question_id"]])
        spans = [_span(g, "reply_timespan", f"example {ex['question_id']}") for g in ex["answer"]]
        n_replies += len(replies)
        # a reply in no span came when no gold answer was due: the flooding r_in_span punishes
        outside += sum(not any(s0 <= t <= s1 for s0, s1 in spans) for t, _ in replies)
        delays += reply_delays(replies, ex["answer"])
    return {"replies": n_replies, "replies_outside_spans": outside,
            "replies_per_example": n_replies / len(examples) if examples else 0.0,
            "mean_delay": sum(delays) / len(delays) if delays else None,
            "turns_with_reply": len(delays)}


def stream_rounds(example, fps):
    """How many frames to stream for evaluation: to the end of the last gold reply span, never past the video.

    rounds = max(1, min(int(duration * fps), ceil(min(duration, last s1) * fps)))
    Example: duration 12.87 s, last s1 = 6.0, fps 1 -> min(12, 6) = 6 rounds.
    """
    duration = float(example["duration"])
    # after the last reply span nothing can score, so streaming further only costs time
    last_s1 = max((float(g["reply_timespan"][1]) for g in example["answer"]), default=duration)
    # ceil: the round at s1 itself must be streamed (spans are inclusive); int(duration * fps): the
    # video has no frame past its end (a span may overrun it by its 1 s tail); max(1, ...): a video
    # shorter than one frame interval still streams one frame
    return max(1, min(int(duration * fps), math.ceil(min(duration, last_s1) * fps)))


# ----------------------------------------------------------------------------------------------
# 2. The MMDuet2 training reward (paper Sec. 4.3.2, Eq. 2)

def mmduet2_reward(turns, answers, judge, context_replies=(), weights=(3, 2, 0.5, 2)):
    """r = w_PAUC*r_PAUC + w_rep*r_rep + w_in_span*r_in_span + w_pfx*r_pfx for one rollout.

    turns: every assistant turn of the rollout segment as (time, text), NO REPLY included, in order.
    answers: gold turns, each with `content`, `question` and `reply_timespan` [s0, s1].
    context_replies: replies already in the dialogue history before the segment.
    weights: (3, 2, 0.5, 2), the paper's; the released code's defaults differ, its run scripts use these.

    r_PAUC: gold turns with s0 <= the last turn's time (the rest were never reached); in-span
        replies minus exact repeats, each judged ALONE on 5 points (S = 4), no pruning -> mean area.
    r_rep: -(share of replies already covered by context + earlier replies).
    r_in_span: -(replies / turns) among the turns in no gold span.
    r_pfx: -(share of turns sharing a >= 50-character prefix with an earlier turn or context reply).

    Worked example (docs/reward.md; judge: "poured" reply 4, "stirs" reply 3, nothing a repeat).
    Gold "Fish sauce is added to the pan." [4, 10], "Sugar is stirred in." [12, 20]; turns every
    2 s from 2 to 22, replies at 6 "Fish sauce is poured into the pan.", 10 (the same text),
    16 "Someone stirs sugar into the pan.", 22 "The pan is washed.":
        r_PAUC = ((1*0.5 + 5*4)/24 + (2*0.5 + 6*3)/32) / 2 = (0.854167 + 0.59375) / 2 = 0.723958
        r_rep = -1/4 (t=10 exact repeat); r_in_span = -1/2 (t=2 silent, t=22 reply); r_pfx = 0
        r = 3*0.723958 - 2*0.25 - 0.5*0.5 - 0 = 1.421875
    """
    turns = [(float(t), text.strip()) for t, text in turns]  # stripped: " NO REPLY" is silence too
    replies = [(t, text) for t, text in turns if text != SILENCE]
    spans = [_span(g, "reply_timespan", f"gold turn {j}") for j, g in enumerate(answers)]
    for j, g in enumerate(answers):
        # the reward judge sees each gold turn's own question (an nQnA dialogue has several)
        if not (isinstance(g.get("content"), str) and isinstance(g.get("question"), str)):
            raise ValueError(f"gold turn {j}: needs text 'content' and 'question', got keys {sorted(g)}")

    # r_PAUC (Eq. 1 with S = 4, each reply judged alone: the paper's two changes to the metric)
    # A rollout is one segment of the video (paper: 20 s); a gold span that starts after its last
    # turn was never offered to the policy, and scoring it as silence would punish what it never saw.
    last_time = max((t for t, _ in turns), default=-math.inf)
    areas = []
    for g, (s0, s1) in zip(answers, spans):
        if s0 > last_time:
            continue  # the rollout stopped before this span began: nothing to judge it on
        seen, points = [], []
        for t, text in replies:
            if not s0 <= t <= s1 or text in seen:  # an exact repeat within the span is not re-judged
                continue
            seen.append(text)
            # judged ALONE, not joined with the earlier replies as the metric does: each reply answers
            # for itself (joined with a right one said before it, a wrong one could still score well)
            score = judge.score(g["question"], g["content"], text, REWARD_SCALE)
            if score is not None:  # a failed call is dropped, never a 0
                points.append((t - s0, score))
        # no prune_late here (docs/reward.md): a late low score stays on the curve and lowers r_PAUC
        areas.append(area_ratio(points, s1 - s0, REWARD_SCALE - 1, omega=0.5))  # start 0.5, no pruning
    r_pauc = sum(areas) / len(areas) if areas else 0.0  # no span reached: no PAUC signal at all

    # r_rep: each reply counted once (the released code counts some judged replies twice)
    # `previous` starts with the replies already in the dialogue history: repeating what the model
    # said before the segment began is as redundant as repeating itself inside it
    previous = [c.strip() for c in context_replies if c.strip() != SILENCE]
    verdicts = []  # one True/False per reply; a failed judge call leaves its reply out
    for _, text in replies:
        if text in previous:
            verdicts.append(True)  # exact repeat: no judge call needed
        elif previous:
            verdict = judge.repeats(list(dict.fromkeys(previous)), text)  # unique, in order: shorter prompt
            if verdict is not None:
                verdicts.append(verdict)
        else:
            verdicts.append(False)  # nothing said before: nothing to repeat
        previous.append(text)
    r_rep = -sum(verdicts) / len(verdicts) if verdicts else 0.0

    # r_in_span: denominator = turns in no gold span, NO REPLY included (released code; the paper's
    # prose says "all reply entries"; we follow the code, which produced the reported numbers)
    # So the penalty is the share of out-of-span turns the policy spoke at: silence there scores 0,
    # a reply at every one of them scores -1, however long the segment is.
    outside = [text for t, text in turns if not any(s0 <= t <= s1 for s0, s1 in spans)]
    r_in_span = -sum(text != SILENCE for text in outside) / len(outside) if outside else 0.0

    # r_pfx: a reply that restates an earlier one before adding news is verbose (docs/reward.md: over all turns)
    # r_rep asks whether ALL of a reply is old, so a reply that restates an earlier one's opening
    # and then adds news passes it; this character test catches the restated opening. NO REPLY
    # turns are compared too, but at 8 characters they can never share 50.
    earlier, verbose = [c.strip() for c in context_replies], 0
    for _, text in turns:
        verbose += any(len(os.path.commonprefix([text, e])) >= PREFIX_CHARS for e in earlier)
        earlier.append(text)
    r_pfx = -verbose / len(turns) if turns else 0.0  # divided by every turn, silent ones included

    # Eq. 2: every part lies in [0, 1] (r_PAUC) or [-1, 0] (the penalties), so the weights alone set
    # how much each behaviour matters
    w_pauc, w_rep, w_in_span, w_pfx = weights  # paper: 3, 2, 0.5, 2 (the released defaults differ)
    total = w_pauc * r_pauc + w_rep * r_rep + w_in_span * r_in_span + w_pfx * r_pfx
    return {"pauc": r_pauc, "rep": r_rep, "in_span": r_in_span, "prefix": r_pfx, "total": total}


# ----------------------------------------------------------------------------------------------
# Files: anno.json (gold) and predictions JSONL, with errors that say where

def load_gold(path):
    """THE loader of a ProactiveVideoQA anno.json for the whole project (eval, infer.py, grpo.py).

    It checks every field the pipeline reads, so a bad file stops before any model loads, with
    one line naming the file, the example (index and question_id) and the field:
        video          a non-empty string (the file name in the videos folder)
        question_id    a string or an int, unique
        duration       seconds, a finite number > 0
        conversation   a non-empty list of {role: str, content: str, time: seconds >= 0}; the first
                       turn is the question and may leave out its time (it is asked at 0); later
                       turns (TV subtitles, nQnA questions) need theirs, or they would land at 0
        answer         a list of {content: str, reply_timespan [s0, s1] with 0 <= s0 < s1,
                       related_timespan [r0, r1] with r0 <= r1, optional question: str}
    Other keys (EGO's `type`, VAD's `num_captions`, TV's `frame` and `audio`) pass through.
    Returns the examples as read.
    """
    # every failure below is a ValueError with the file's name: the CLIs print it as one line
    try:
        examples = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: not a ProactiveVideoQA anno.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}: expected a non-empty JSON list of examples")
    seen = set()
    for i, ex in enumerate(examples):
        where = f"{path} example {i}"
        missing = [k for k in ("question_id", "duration", "conversation", "answer", "video")
                   if not isinstance(ex, dict) or k not in ex]
        if missing:  # all the missing keys at once: one fix, not one rerun per key
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if not _is_id(ex["question_id"]):
            raise ValueError(f"{where}: 'question_id' must be a string or an integer, got {ex['question_id']!r}")
        where += f" ({ex['question_id']})"  # later errors name the id too: easier to find than an index
        # predictions are matched to gold by question_id: a duplicate would score one video's
        # replies against the other's answers
        if ex["question_id"] in seen:
            raise ValueError(f"{where}: question_id appears twice")
        seen.add(ex["question_id"])
        if not (isinstance(ex["video"], str) and ex["video"]):
            raise ValueError(f"{where}: 'video' must be a file name, got {ex['video']!r}")
        if not (_is_seconds(ex["duration"]) and ex["duration"] > 0):
            raise ValueError(f"{where}: 'duration' must be a number of seconds > 0, got {ex['duration']!r}")
        conv = ex["conversation"]
        if not (isinstance(conv, list) and conv):
            raise ValueError(f"{where}: 'conversation' must be a non-empty list of turns, the question first")
        for j, turn in enumerate(conv):
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("role", "content"))):
                raise ValueError(f"{where} conversation {j}: a turn needs a text 'role' and 'content', got {turn!r:.99}")
            # j == 0 without a time is the question asked at 0; any turn that does carry a time is checked
            if (j or "time" in turn) and not (_is_seconds(turn.get("time")) and turn["time"] >= 0):
                raise ValueError(f"{where} conversation {j}: 'time' must be seconds >= 0, got {turn.get('time')!r}")
        if not isinstance(ex["answer"], list):
            raise ValueError(f"{where}: 'answer' must be a list of gold turns")
        for j, g in enumerate(ex["answer"]):
            if not (isinstance(g, dict) and isinstance(g.get("content"), str)):
                raise ValueError(f"{where} answer {j}: needs the gold text 'content', got {g!r:.99}")
            _span(g, "reply_timespan", f"{where} answer {j}")  # called for its checks; the values are read later
            _span(g, "related_timespan", f"{where} answer {j}")
            if not isinstance(g.get("question", ""), str):  # optional: absent means conversation[0]'s question
                raise ValueError(f"{where} answer {j}: 'question' must be text, got {g['question']!r}")
    return examples


def gold_warnings(example, video_seconds=None, turn=0.0):
    """What in one gold example (as load_gold returns it) no model can be scored on fairly: [sentence], or [].

    From the file alone: an empty gold answer (a reply would be judged against nothing), a reply span
    or a user turn (question, subtitle) after the example's `duration`. With the video's own length
    (`video_seconds`), spans and turns are held to it instead, and a `duration` that differs from it by
    more than `turn` seconds (one user turn) is named: another cut of the video?
    Such examples are KEPT, warned about and counted, not refused: they are facts of the benchmark, not
    mistakes in the command, and refusing would stop a whole benchmark over one example; dropping them
    would change the metric's denominator, and the score would no longer compare with published ones.
    So an unreachable span scores as silence (0.25), as the benchmark defines it, and the warning says so.
        duration 30, reply span [31, 33] -> ["reply span 0 [31, 33] starts after the video ends (30 s): ..."]
    """
    end = example["duration"] if video_seconds is None else video_seconds
    out = []
    if video_seconds is not None and abs(example["duration"] - video_seconds) > turn:
        out.append(f"'duration' is {example['duration']:g} s but the video lasts {video_seconds:g} s "
                   "(another cut of it?): spans may not match what it shows")
    for j, g in enumerate(example["answer"]):
        if not g["content"].strip():
            out.append(f"answer {j} is empty: every reply in its span is judged against nothing")
        s0, s1 = g["reply_timespan"]
        if s0 > end:
            out.append(f"reply span {j} [{s0:g}, {s1:g}] starts after the video ends ({end:g} s): no reply can "
                       "reach it, and it scores as silence")
    for j, c in enumerate(example["conversation"]):
        if c.get("time", 0.0) > end:
            out.append(f"conversation {j} at {c['time']:g} s comes after the video ends ({end:g} s): "
                       "the model never sees it")
    return out


def load_predictions(path, known_ids=None):
    """preds.jsonl -> {question_id: [(time, text), ...]}, assistant replies only (NO REPLY dropped)."""
    preds = {}
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:  # e.g. UTF-16, as some Windows editors save: the error would name no file
        raise ValueError(f"{path} is not UTF-8 text (saved as UTF-16?): save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not (isinstance(row, dict) and "question_id" in row and isinstance(row.get("model_response_list"), list)):
            raise ValueError(f"{where}: expected {{\"question_id\": ..., \"model_response_list\": [...]}}")
        qid = row["question_id"]
        if not _is_id(qid):
            raise ValueError(f"{where}: 'question_id' must be a string or an integer, got {qid!r}")
        # an id the gold does not know means the wrong gold or predictions file: better to stop
        # than to score the overlap and print a number that looks fine
        if known_ids is not None and qid not in known_ids:
            raise ValueError(f"{where}: question_id {qid!r} is not in the gold file")
        if qid in preds:  # two runs appended to one file: which one to score is not ours to guess
            raise ValueError(f"{where}: question_id {qid!r} appears twice")
        replies = []
        for k, turn in enumerate(row["model_response_list"]):
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):  # else a reply could vanish unseen
                raise ValueError(f"{where}: turn {k} needs a 'role' (a {{role, content, time}} object), got {turn!r:.99}")
            if turn["role"] != "assistant":
                continue  # user turns (text or image) are context, not predictions
            t, text = turn.get("time"), turn.get("content")
            # the time decides which gold span a reply falls in: a missing or NaN one cannot be guessed
            if not (_is_seconds(t) and t >= 0 and isinstance(text, str)):
                raise ValueError(f"{where}: an assistant turn needs a numeric 'time' (finite, >= 0 s) "
                                 f"and a text 'content', got {turn!r:.99}")
            if text.strip() != SILENCE:  # should already be left out; silence anyway
                replies.append((float(t), text.strip()))
        preds[qid] = replies
    if not preds:
        raise ValueError(f"{path}: no predictions (the file is empty)")
    return preds


def evaluate(gold, pred_path, judge, omegas=(0.0, 0.5, 1.0), max_failures=0.01):
    """Score one predictions file against `gold` (load_gold's examples): (summary, marks).

    summary: everything `reward.py eval` prints, as a dict (judged once, areas computed per omega).
    `valid` is False when more than `max_failures` of this file's judge calls failed: a failed
    judgment is dropped and its reply counts as silence, so with many failures the PAUC measures
    the judge, not the model. marks: reply_notes, for the timeline page.
    """
    calls0, hits0, failures0 = judge.calls, judge.cache_hits, judge.failures  # the judge may serve several files
    preds = load_predictions(pred_path, known_ids={ex["question_id"] for ex in gold})
    # a run may cover part of the benchmark (an interrupted infer.py): the examples it has are
    # scored, the others are listed as skipped so the reader knows the PAUC covers fewer videos
    examples = [ex for ex in gold if ex["question_id"] in preds]
    skipped = [ex["question_id"] for ex in gold if ex["question_id"] not in preds]
    if not examples:
        raise ValueError(f"{pred_path}: no prediction matches a gold example")
    turns = metric_turns(examples, preds, judge)
    if not turns:
        raise ValueError(f"{pred_path}: the gold examples it predicts have no answer turns")
    # gold the video cannot reach, or empty answers: kept and scored as defined, but said (gold_warnings)
    warnings = {ex["question_id"]: w for ex in examples if (w := gold_warnings(ex))}
    # the judge scores do not depend on omega, only the areas do: judge once, compute three curves
    pauc = {w: 100 * sum(area_ratio(p, L, METRIC_SCALE - 1, w) for p, L, _ in turns) / len(turns) for w in omegas}
    dup = duplicate_proportion({ex["question_id"]: preds[ex["question_id"]] for ex in examples}, judge)
    stats = reply_stats(examples, preds)
    calls, hits, failures = judge.calls - calls0, judge.cache_hits - hits0, judge.failures - failures0
    share = failures / (calls + hits) if calls + hits else 0.0
    summary = {"pauc": {str(w): v for w, v in pauc.items()}, "duplicate_proportion": dup,
               "examples": len(examples), "skipped": skipped, "gold_turns": len(turns), "gold_warnings": warnings,
               "replies": stats["replies"], "judge_calls": calls, "judge_cache_hits": hits,
               "judge_failures": failures, "judge_failure_share": share,
               "judge_last_failure": getattr(judge, "last_error", None) if failures else None,
               "valid": share <= max_failures,
               "diagnostics": {"replies_per_example": stats["replies_per_example"],
                               "replies_outside_spans": stats["replies_outside_spans"],
                               "mean_reply_delay_s": stats["mean_delay"],
                               "gold_turns_with_reply": stats["turns_with_reply"]}}
    return summary, reply_notes(examples, preds, turns)


def format_summary(s):
    skipped = f" ({len(s['skipped'])} skipped, no prediction: {', '.join(map(str, s['skipped']))})" if s["skipped"] else ""
    d = s["diagnostics"]
    delay = "n/a" if d["mean_reply_delay_s"] is None else f"{d['mean_reply_delay_s']:.2f} s"
    invalid = "" if s["valid"] else "  (NOT A RESULT: too many judge calls failed)"
    warned = [f"gold warning, {qid}: {w}" for qid, ws in s["gold_warnings"].items() for w in ws]
    return "\n".join(warned + [
        f"examples {s['examples']}{skipped}, gold turns {s['gold_turns']}, replies {s['replies']}"
        + (f" ({len(s['gold_warnings'])} with gold warnings, above: scored as the benchmark defines them)"
           if warned else ""),
        "PAUC x100: " + "  ".join(f"w={w} {v:.2f}" for w, v in s["pauc"].items()) + invalid,
        f"reply duplicate proportion (our reconstruction): {100 * s['duplicate_proportion']:.1f}%",
        f"judge: {s['judge_calls']} calls, {s['judge_cache_hits']} cache hits, {s['judge_failures']} failed",
        f"extra diagnostics (not the paper's metric): {d['replies_per_example']:.2f} replies/example "
        f"({d['replies_outside_spans']} of {s['replies']} outside every gold span), "
        f"mean reply delay {delay} after s0 ({d['gold_turns_with_reply']} of {s['gold_turns']} gold turns replied in span)",
    ] + ([f"last judge failure: {s['judge_last_failure']}"] if s["judge_last_failure"] else []))


# ----------------------------------------------------------------------------------------------
# The timeline page (`eval --html`): WHEN each model spoke, against the gold reply spans
#
# One self-contained HTML file (inline SVG and CSS, no script, nothing fetched), one section per
# video. Time runs left to right on the same axis for every predictions file, so two runs of the
# same video can be compared at a glance. Every text a user or a model wrote goes through
# html.escape: a reply "<script>" shows as text.

PLOT_X0, PLOT_W = 180, 900  # px: a column of lane names, then the time axis from 0 to the video's end
AXIS_H, LANE_H = 22, 18  # px: tick labels on top, then one lane per gold turn and one per predictions file
SCORE_COLOURS = {2: "#1a9850", 1: "#f0a500", 0: "#d73027"}  # a reply's best metric score (S = 2)
NO_SCORE = "#999999"  # outside every span, an exact repeat, pruned, or a failed judge call
PAGE_CSS = """body { font: 14px sans-serif; margin: 1.5em; } table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; } svg text { font-size: 11px; }
.span { fill: #cfe2f3; stroke: #6fa8dc; } .tick { stroke: #eee; } .base { stroke: #bbb; }
.name { text-anchor: end; } section { margin-top: 1.5em; }"""


def timeline_x(t, end):
    """The x pixel of video time t (seconds) on a video's axis, which runs from 0 to `end` seconds."""
    return PLOT_X0 + PLOT_W * t / end


def video_svg(example, lanes, end):
    """One video's timeline: a lane per gold turn (its reply span as a bar, its answer written at
    s0) and a lane per predictions file (a dot per reply at its time; no dot is silence). A shape's
    <title> shows its full text on hover. lanes: [(label, reply_notes' marks or None)]."""
    e, n_gold = html.escape, len(example["answer"])
    height = AXIS_H + (n_gold + len(lanes)) * LANE_H + 4
    out = [f'<svg width="{PLOT_X0 + PLOT_W + 20}" height="{height}">']
    # the smallest round step that gives at most 10 ticks (past 100 minutes: a tenth of the video)
    step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600) if end / s <= 10), math.ceil(end / 10))
    for tick in range(0, int(end) + 1, step):
        x = timeline_x(tick, end)
        out.append(f'<line class="tick" x1="{x:.2f}" y1="{AXIS_H - 6}" x2="{x:.2f}" y2="{height}"/>'
                   f'<text x="{x:.2f}" y="{AXIS_H - 9}" text-anchor="middle">{tick} s</text>')
    for j, g in enumerate(example["answer"]):
        (s0, s1), y = g["reply_timespan"], AXIS_H + j * LANE_H
        x0, x1 = timeline_x(s0, end), timeline_x(s1, end)
        about = f"gold {j + 1}, reply span {s0:g}-{s1:g} s, question: {_question(example, g)}; answer: {g['content']}"
        out.append(f'<text class="name" x="{PLOT_X0 - 6}" y="{y + 13}">gold {j + 1}</text>'
                   f'<rect class="span" x="{x0:.2f}" y="{y + 2}" width="{x1 - x0:.2f}" height="{LANE_H - 4}">'
                   f'<title>{e(about)}</title></rect><text x="{x0 + 3:.2f}" y="{y + 13}">{e(g["content"])}</text>')
    for k, (label, marks) in enumerate(lanes):
        y = AXIS_H + (n_gold + k) * LANE_H + LANE_H // 2  # the lane's middle: the dots sit on it
        out.append(f'<text class="name" x="{PLOT_X0 - 6}" y="{y + 4}">{e(label)}</text>')
        if marks is None:  # this file has no line for the video
            out.append(f'<text x="{PLOT_X0 + 4}" y="{y + 4}">(no prediction)</text>')
            continue
        out.append(f'<line class="base" x1="{PLOT_X0}" y1="{y}" x2="{PLOT_X0 + PLOT_W}" y2="{y}"/>')
        for t, text, best, note in marks:
            out.append(f'<circle class="reply" cx="{timeline_x(t, end):.2f}" cy="{y}" r="5" '
                       f'fill="{SCORE_COLOURS.get(best, NO_SCORE)}"><title>{e(f"{label} at {t:g} s: {text} ({note})")}'
                       f'</title></circle>')
    return "\n".join(out + ["</svg>"])


def write_html(path, gold_path, gold, runs):
    """The timeline page: the PAUC table of every run on top, then one timeline per gold example.

    runs: [(label, pred_path, summary, marks)], marks as reply_notes returns them.
    """
    e = html.escape
    head = ["<tr><th>run</th><th>predictions</th>"
            + "".join(f"<th>PAUC w={w}</th>" for w in runs[0][2]["pauc"])
            + "<th>duplicates</th><th>replies</th><th>judge failures</th><th>result</th></tr>"]
    for label, pred, s, _ in runs:
        head.append(f"<tr><td>{e(label)}</td><td>{e(str(pred))}</td>"
                    + "".join(f"<td>{v:.2f}</td>" for v in s["pauc"].values())
                    + f"<td>{100 * s['duplicate_proportion']:.1f}%</td><td>{s['replies']}</td>"
                    f"<td>{s['judge_failures']}</td><td>{'valid' if s['valid'] else 'NOT A RESULT'}</td></tr>")
    body = []
    for ex in gold:
        lanes = [(label, marks.get(ex["question_id"])) for label, _, _, marks in runs]
        # the axis ends at the video's end, or later if a span or a reply does (spans may overrun)
        end = max([ex["duration"]] + [g["reply_timespan"][1] for g in ex["answer"]]
                  + [t for _, marks in lanes for t, *_ in marks or ()])
        lists = "".join(f"<details><summary>{e(label)}: {len(marks)} replies</summary><ol>"
                        + "".join(f"<li>{t:g} s: {e(text)} <i>({e(note)})</i></li>" for t, text, _, note in marks)
                        + "</ol></details>" for label, marks in lanes if marks)
        body.append(f"<section><h2>{e(str(ex['question_id']))}</h2><p>{e(ex['video'])}, {ex['duration']:g} s; "
                    f"question: {e(ex['conversation'][0]['content'])}</p>\n"
                    f"{video_svg(ex, lanes, end)}\n{lists}</section>")
    Path(path).write_text("\n".join([
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>PAUC timeline</title>',
        f"<style>{PAGE_CSS}</style></head><body>",
        f"<h1>When each model spoke: {e(str(gold_path))}</h1>",
        "<table>", *head, "</table>",
        "<p>Blue bars: gold reply spans (when a reply is welcome), each with its answer. Dots: replies at "
        "their time, coloured by the metric's score in the gold span they fell in: green 2, amber 1, red 0 "
        "of 2 (a reply is judged together with the distinct replies before it in that span: cumulative "
        "judging); grey: outside every span, an exact repeat, pruned or a failed judge call. No dot: "
        "silence. Hover a bar or a dot for its text.</p>",
        *body, "</body></html>\n"]))


# ----------------------------------------------------------------------------------------------
# The command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Score streaming predictions with the ProactiveVideoQA PAUC.")
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="PAUC x100 at w = 0 / 0.5 / 1, duplicate proportion, counts")
    # data
    ev.add_argument("--gold", required=True, type=path, help="benchmark anno.json (a JSON list of examples)")
    ev.add_argument("--pred", required=True, nargs="+", type=path,
                    help="predictions JSONL from infer.py, one example per line; several files (e.g. an SFT "
                         "and a GRPO run) are each scored, with one summary each")
    ev.add_argument("--label", nargs="+", default=None,
                    help="a name per --pred file, in the same order (default: the file names without .jsonl)")
    ev.add_argument("--json", default=None, type=path,
                    help="also write the summary to this JSON file; with several --pred: "
                         '{"gold": GOLD, "runs": {LABEL: summary with its "pred" path}}')
    ev.add_argument("--html", default=None, type=path,
                    help="also write a self-contained timeline page: per video, the gold reply spans and "
                         "every file's replies at their time, with their scores")
    # judge
    ev.add_argument("--judge", choices=["offline", "openai"], default="offline",
                    help="offline: deterministic word overlap; openai: an LLM behind an OpenAI-compatible endpoint")
    ev.add_argument("--model", default=None, help="judge model (default: $JUDGE_MODEL)")
    ev.add_argument("--base-url", default=None, help="endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    ev.add_argument("--api-key", default=None, help="key (default: $OPENAI_API_KEY, prefer it: flags show in ps)")
    ev.add_argument("--cache", default=DEFAULT_CACHE, type=path, help="JSONL cache of judge answers ('' to disable)")
    ev.add_argument("--workers", type=int, default=8, help="judge requests in flight at once")
    ev.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request")
    ev.add_argument("--retries", type=int, default=3, help="retries of a timed-out / 429 / 5xx request")
    ev.add_argument("--max-failures", type=float, default=0.01,
                    help="largest share of judge calls that may fail: a failed judgment is dropped (its reply "
                         "counts as silence), so past this share eval prints what happened and exits 1; "
                         "default 0.01 lets a rare timeout pass and stops a broken judge")
    args = parser.parse_args(argv)
    if not 0 <= args.max_failures <= 1:
        raise SystemExit(f"reward.py: --max-failures is a share of the judge calls, in [0, 1]; got {args.max_failures}")
    labels = args.label or [Path(p).stem for p in args.pred]
    # labels key the --json runs and name the page's lanes: two equal ones would overwrite each other
    if len(labels) != len(args.pred) or len(set(labels)) != len(labels):
        raise SystemExit(f"reward.py: {len(args.pred)} --pred files need as many distinct names, got {labels}; "
                         "give them with --label")
    cached = args.judge == "openai" and args.cache  # only then do judge answers outlive the run

    judge, runs = None, []  # judge stays None if Ctrl-C comes before it is built (see below)
    try:
        # two evals at once would ask every judge question twice and write each answer twice
        from runs import hold_output  # moved to runs.py
        for out in [args.cache if cached else None, args.json, args.html]:
            if out:
                hold_output(out)
        if args.judge == "offline":
            judge = OfflineJudge()
        else:
            judge = OpenAIJudge(model=args.model, base_url=args.base_url, api_key=args.api_key,
                                cache_path=args.cache or None, max_workers=args.workers,
                                timeout=args.timeout, retries=args.retries)
        gold = load_gold(args.gold)
        for label, pred in zip(labels, args.pred):  # one judge: its cache makes the calls the files share free
            summary, marks = evaluate(gold, pred, judge, max_failures=args.max_failures)
            if len(args.pred) > 1:
                print(f"== {label}: {pred}")
            print(format_summary(summary))
            runs.append((label, pred, summary, marks))
        result = runs[0][2] if len(runs) == 1 else {  # one file: the summary itself, as it always was
            "gold": args.gold, "runs": {label: dict(s, pred=pred) for label, pred, s, _ in runs}}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.html:
            write_html(args.html, args.gold, gold, runs)
    except (ValueError, OSError, JudgeError) as e:
        raise SystemExit(f"reward.py: {e}") from None  # one line, no traceback
    except KeyboardInterrupt:  # run_all's workers are daemons: nothing waits for the requests in flight
        if cached and judge is not None:
            kept = f"the {judge.cached} judge answers are in {judge.cache_path}: a rerun asks only the rest"
        else:
            kept = "no judge answer is kept (offline judge or --cache ''): a rerun starts over"
        print(f"reward.py: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, the shell's convention
    failed = [(label, s) for label, _, s, _ in runs if not s["valid"]]
    if failed:
        what = "; ".join(f"{label + ': ' if len(runs) > 1 else ''}{s['judge_failures']} of "
                         f"{s['judge_calls'] + s['judge_cache_hits']} judge calls failed "
                         f"({100 * s['judge_failure_share']:.1f}%)" for label, s in failed)
        kept = f"the answers already in {args.cache} are kept, " if cached else ""
        raise SystemExit(f"reward.py: {what}, more than --max-failures {100 * args.max_failures:g}%: the scores "
                         f"above are not a result; fix the judge (see its last failure) and rerun: "
                         f"{kept}only the failed calls are asked again")
    return result


if __name__ == "__main__":
    main()
