"""The LLM client that data.py and the judges share, and the one way to run LLM calls concurrently.

Role in the pipeline: `data.py build` writes its questions and summaries through `LLMClient` (paper
Sec. 3); `grpo.py` (the reward, Sec. 4.3.2) and `evaluate.py` (the metric) ask `OpenAIJudge`, an LLM
behind any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API). reward.py defines what a judge
answers (`reward.Judge`) and keeps the offline one; this file is the network side of it.
- `LLMClient`: retries with backoff, an on-disk cache (a rerun asks nothing twice), counters, and no
  secret in anything it returns, prints or writes.
- `OpenAIJudge`: reward.Judge's `score` and `repeats` as prompts, answers parsed strictly.
- `imap`: fn(*job) for every job, in job order, several at once; Ctrl-C or a failed job ends it at
  once, without waiting for the requests in flight. data.py, grpo.py and the judge's `map` use it.

Where we depart from the paper: the judge instructions are our own wording of the rubric (docs/reward.md).

Run:
    python -m pytest tests/test_llm.py -q    # the judge against a fake endpoint on 127.0.0.1, no network
"""
import hashlib
import json
import os
import queue
import re
import threading
import time
from pathlib import Path

import openai
from tqdm import tqdm

from reward import JudgeError, parse_score, parse_yes_no

# one cache for every run on this machine: the key holds the model, so two judges never share an answer
DEFAULT_CACHE = "~/.cache/mmduet2/judge.jsonl"
# a secret as an endpoint may echo it back: "Bearer <token>" (the Authorization header) or an "sk-..." key
SECRET = re.compile(r"(?i)(bearer\s+)[\w.~+/-]+=*|\bsk-[\w-]{8,}")


# ----------------------------------------------------------------------------------------------
# The client

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
      JudgeError; every later ask raises it at once, so `imap` stops without a storm.
    - Counters: `calls` (questions sent to the endpoint, retries not counted), `cache_hits`,
      `failures` (calls with no usable answer, parse failures included), `last_error`.
    - No secret leaves it: some proxies echo the Authorization header in their error bodies, so
      every answer, error message and JudgeError is redacted (the key, bearer tokens, "sk-..." keys).
    Thread-safe: the cache, the file and the counters are guarded by one lock; requests run
    outside it, up to `max_workers` at a time when they go through `imap` (OpenAIJudge.map).
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


# ----------------------------------------------------------------------------------------------
# The LLM judge (reward.Judge over the client)

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

    def map(self, fn, jobs):
        """fn(*job) for each job, in job order, up to max_workers requests at once (reward.Judge.map)."""
        return imap(fn, jobs, self.max_workers, desc="judge")


# ----------------------------------------------------------------------------------------------
# Many calls at once: the one way, for data.py's writer, grpo.py's rewards and the judge's `map`

def imap(fn, jobs, workers=1, desc=None, unit="it", leave=False):
    """fn(*job) for each job, yielded in job order, up to `workers` jobs running at once; with `desc`,
    a progress bar (unit, leave: tqdm's).

    The workers are daemon threads, not a ThreadPoolExecutor: Python joins an executor's threads
    at exit, so after Ctrl-C it would wait for every request in flight (up to the timeout). Here
    the caller can leave at once: on Ctrl-C, on an error in any job (a JudgeError: raised here as
    soon as it comes, results that wait for an earlier job are dropped), or when the caller closes
    the generator, no worker starts another job, and a request in flight is abandoned (its answer,
    if it comes first, still reaches the cache).
    """
    jobs = list(jobs)
    workers = min(workers, len(jobs))  # never more threads than jobs
    # `with`: an interrupted bar is erased before the caller prints; disable=None: a terminal only
    with tqdm(total=len(jobs), desc=desc, unit=unit, leave=leave, disable=None if desc else True) as bar:
        if workers <= 1:  # the offline judge, the toy writer, or a single job: no threads at all
            for job in jobs:
                result = fn(*job)
                bar.update()
                yield result
            return
        # todo: job indices waiting for a worker; done: one message per finished job (index, result, error)
        todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        for i in range(len(jobs)):
            todo.put(i)

        def work():
            while not stop.is_set():  # checked between jobs: after Ctrl-C or an error, no new request starts
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, fn(*jobs[i]), None))
                except Exception as e:  # a JudgeError: the caller's thread re-raises it
                    done.put((i, None, e))  # handed to the main thread: an exception in a thread would only be printed

        for _ in range(workers):
            threading.Thread(target=work, daemon=True).start()
        finished = {}  # job index -> result, kept until every earlier job is in: the order is the jobs'
        try:
            for i in range(len(jobs)):
                while i not in finished:  # every job sends one message: job i's comes, or an error first
                    try:  # short waits: a Ctrl-C that lands just before a wait begins cannot end that
                        k, result, error = done.get(timeout=0.2)  # wait, so it is seen at the next one (a wait
                    except queue.Empty:  # without a timeout would last until a slow request returns)
                        continue
                    if error is not None:
                        raise error
                    finished[k] = result
                    bar.update()
                yield finished.pop(i)
        finally:
            stop.set()  # on every way out: the last job, an error, Ctrl-C, or the caller closing the generator
