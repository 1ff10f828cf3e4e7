"""Tests for llm.py: the OpenAI judge driven through the real `openai` client against a tiny
OpenAI-compatible server that the test starts on 127.0.0.1 (tests/conftest.py: garbage bodies, slow
answers, a cut cache line), and `imap`, the one way LLM calls run concurrently. No network, a few seconds.

Run: python -m pytest tests/test_llm.py -q
"""
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # llm.py lives in the repo root
from conftest import example  # noqa: E402
from llm import OpenAIJudge, imap  # noqa: E402
from reward import JudgeError, pauc_metric  # noqa: E402


def make_judge(url, cache, **kw):
    # short timeout and backoff so the failure cases take well under a second each
    return OpenAIJudge(model="judge-m", base_url=url, api_key="test", cache_path=cache,
                       timeout=kw.pop("timeout", 0.3), retries=kw.pop("retries", 1), backoff=0.01, **kw)


def test_openai_judge_good_garbage_500_timeout_and_cache(server, tmp_path):
    def answer(text):
        if "GARBAGE" in text:
            return "The answer is three."
        if "ERROR500" in text:
            return 500
        if "SLOW" in text:
            return ("sleep", 1.0)
        if "New reply:" in text:
            return "No."
        return "3" if "GOOD" in text else "1"

    server.answer = answer
    cache = tmp_path / "judge.jsonl"
    judge = make_judge(server.url, cache)
    assert judge.score("What?", "gold", "GOOD answer", 3) == 2
    assert judge.score("What?", "gold", "bad answer", 5) == 0  # "1" is a real score of 0
    assert judge.repeats(["A."], "B.") is False
    assert judge.score("What?", "gold", "GARBAGE", 3) is None  # answered, unparsable: retried once, then dropped
    assert judge.score("What?", "gold", "ERROR500", 3) is None  # retried once, then dropped
    assert judge.score("What?", "gold", "SLOW", 3) is None  # timed out twice, dropped
    assert (judge.calls, judge.cache_hits, judge.failures) == (6, 0, 3)
    assert len(server.requests) == 9  # 3 answered + 2 for the garbage + 2 for the 500 + 2 for the timeout
    path, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-m" and body["temperature"] == 0
    assert body["messages"][0]["role"] == "system" and "3 = mostly covered" in body["messages"][0]["content"]
    assert "Assistant's answer: GOOD answer" in body["messages"][1]["content"]

    # a re-run with a fresh judge on the same cache file: answered calls make no HTTP request
    before = len(server.requests)
    again = make_judge(server.url, cache)
    assert again.score("What?", "gold", "GOOD answer", 3) == 2
    assert again.score("What?", "gold", "bad answer", 5) == 0
    assert again.repeats(["A."], "B.") is False
    assert len(server.requests) == before and (again.calls, again.cache_hits, again.failures) == (0, 3, 0)
    # failed calls, unparsable answers included, were not cached: a re-run asks them again
    assert again.score("What?", "gold", "GARBAGE", 3) is None and len(server.requests) == before + 2
    assert again.score("What?", "gold", "ERROR500", 3) is None and len(server.requests) == before + 4


def test_a_judge_answer_with_several_numbers_is_a_failed_call_never_cached(server, tmp_path):
    # "1 3" was read as 1 and cached: once the judge was fixed, the rerun made 0 calls and failed again
    answers = iter(["1 3", "3\n1", "3/5", "2.5"])
    server.answer = lambda text: next(answers)
    cache = tmp_path / "judge.jsonl"
    judge = make_judge(server.url, cache, retries=3)
    assert judge.score("q", "gold", "pred", 3) is None  # 4 answers, none one number on the scale
    assert (judge.calls, judge.failures, len(server.requests)) == (1, 1, 4)  # one call, retried 3 times, failed
    assert "unusable judge answer '2.5'" in judge.last_error and not cache.exists()
    server.answer = lambda text: "3"  # the judge fixed: the rerun asks again, and caches the score
    again = make_judge(server.url, cache)
    assert again.score("q", "gold", "pred", 3) == 2 and (again.calls, again.failures) == (1, 0)
    assert make_judge(server.url, cache).score("q", "gold", "pred", 3) == 2 and len(server.requests) == 5
    # an unusable answer an older version cached is asked again too, not served from the cache
    cache.write_text(cache.read_text().replace('"answer": "3"', '"answer": "1 3"'))
    old = make_judge(server.url, cache)
    assert old.score("q", "gold", "pred", 3) == 2 and (old.calls, old.cache_hits) == (1, 0)


GARBAGE_200 = {  # what a proxy or a half-broken server may send with status 200
    "not JSON": ("application/json", b'{"id": "c1", "choi'),
    "HTML": ("text/html", b"<html><body>502 Bad Gateway</body></html>"),
    "no choices": ("application/json", b'{"id": "c1", "object": "chat.completion"}'),
    "empty choices": ("application/json", b'{"id": "c1", "choices": []}'),
    "null message": ("application/json", b'{"id": "c1", "choices": [{"index": 0, "message": null}]}'),
}


@pytest.mark.parametrize("body", GARBAGE_200.values(), ids=list(GARBAGE_200))
def test_openai_judge_treats_a_garbage_200_as_a_failed_call(server, tmp_path, body):
    server.answer = lambda text: ("raw", *body)
    cache = tmp_path / "judge.jsonl"
    judge = make_judge(server.url, cache)
    assert judge.score("q", "gold", "pred", 3) is None  # dropped, not a crash of the run
    assert len(server.requests) == 2  # retried once, like a 5xx
    assert (judge.calls, judge.failures) == (1, 1)
    assert judge.last_error.startswith(server.url) and "not a chat completion" in judge.last_error
    assert not cache.exists()  # nothing cached: a rerun asks again
    # in a concurrent run (the path `evaluate.py` takes) the failure is counted, not raised
    exs = [example(f"v{i}", [(0, 10, 10)]) for i in range(3)]
    assert pauc_metric(exs, {f"v{i}": [(2, "A reply.")] for i in range(3)}, judge) == pytest.approx(0.25)
    assert judge.failures == 4


def test_openai_judge_recovers_from_a_transient_500_and_survives_a_cut_cache_line(server, tmp_path):
    seen = []

    def answer(text):
        seen.append(text)
        return 500 if len(seen) == 1 else "2"

    server.answer = answer
    cache = tmp_path / "judge.jsonl"
    cache.write_text('{"key": "abc", "answer": "3"}\n{"key": "cut sho')  # an interrupted earlier run
    judge = make_judge(server.url, cache)
    assert judge.score("q", "gold", "pred", 3) == 1  # second attempt succeeded
    assert (judge.calls, judge.failures) == (1, 0)
    lines = cache.read_text().splitlines()
    assert json.loads(lines[-1])["answer"] == "2" and len(lines) == 3  # the cut line was closed first


def test_pauc_metric_with_openai_judge_concurrently(server, tmp_path):
    server.answer = lambda text: "3" if "right" in text else "2"
    exs = [example(f"v{i}", [(0, 10, 10), (20, 30, 30)], question=f"Question {i}?") for i in range(6)]
    preds = {f"v{i}": [(4, "right"), (24, "meh")] for i in range(6)}
    judge = make_judge(server.url, tmp_path / "c.jsonl", max_workers=4)
    value = pauc_metric(exs, preds, judge, omega=0)
    assert value == pytest.approx(((4 * 0.5 + 6 * 2) / 20 + (4 * 0.5 + 6 * 1) / 20) / 2)
    assert judge.calls == 12 and len(server.requests) == 12  # 12 distinct inputs: the questions differ
    assert judge.failures == 0


def test_unreachable_endpoint_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                        cache_path=None, retries=1, backoff=0.01, timeout=1)
    with pytest.raises(JudgeError) as err:
        judge.score("q", "gold", "pred", 3)
    assert f"127.0.0.1:{port}" in str(err.value) and "unreachable" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(JudgeError):  # later calls stop at once
        judge.repeats(["a"], "b")
    assert judge.calls == 1


def test_openai_judge_needs_a_model(monkeypatch):
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    with pytest.raises(JudgeError, match="JUDGE_MODEL"):
        OpenAIJudge(base_url="http://127.0.0.1:1/v1", api_key="k", cache_path=None)


# ----------------------------------------------------------------------------------------------
# imap: the one way to run LLM calls concurrently

def test_imap_yields_in_job_order_with_at_most_workers_at_once():
    running, most, lock = [0], [0], threading.Lock()

    def job(i, seconds):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(seconds)  # later jobs finish first: the order must still be the jobs'
        with lock:
            running[0] -= 1
        return i

    jobs = [(i, 0.05 * (6 - i)) for i in range(6)]
    assert list(imap(job, jobs, workers=3)) == list(range(6)) and most[0] == 3
    assert list(imap(job, jobs[:2], workers=1)) == [0, 1] and most[0] == 3  # one worker: inline, one at a time


def test_imap_raises_a_failed_job_at_once_and_starts_no_other():
    started, release = [], threading.Event()

    def job(i):
        started.append(i)
        if i == 0:
            raise JudgeError("the judge endpoint went away")
        release.wait(30)  # a request that hangs: imap must not wait for it
        return i

    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="went away"):
        list(imap(job, [(i,) for i in range(10)], workers=2))
    assert time.monotonic() - t0 < 5  # the requests in flight (job 1, maybe 2) were not waited for
    before = len(started)
    release.set()  # they return now: their workers see the stop and take no other job
    time.sleep(0.3)
    assert before <= 3 and len(started) == before
