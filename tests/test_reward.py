"""Tests for reward.py: every worked example of docs/reward.md, checked by hand, plus the rules
around it (monotonicity, inclusive spans, pruning, truncated rollouts), the file loaders and the
CLI (bad input, judge failures, Ctrl-C, several prediction files, the timeline page), and the
OpenAI judge driven through the real `openai` client against a tiny OpenAI-compatible server
that the test starts on 127.0.0.1 (garbage bodies, echoed secrets, slow answers). No network,
about ten seconds in all.

Run: python -m pytest tests/test_reward.py -q
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reward.py lives in the repo root
import reward  # noqa: E402
from conftest import another_run_writing  # noqa: E402
from reward import (SILENCE, JudgeError, OfflineJudge, OpenAIJudge, area_ratio,  # noqa: E402
                    duplicate_proportion, mmduet2_reward, pauc_metric, prune_late)


class ScriptedJudge:
    """A judge with fixed answers: score by prediction text, repeats by new text; records every call."""

    def __init__(self, scores=None, repeats=None, default_score=0):
        self.scores, self.repeat_map, self.default_score = scores or {}, repeats or {}, default_score
        self.score_calls, self.repeat_calls = [], []
        self.calls = self.cache_hits = self.failures = 0

    def score(self, question, gold, pred, scale):
        self.score_calls.append((question, gold, pred, scale))
        self.calls += 1
        return self.scores.get(pred, self.default_score)

    def repeats(self, previous, new):
        self.repeat_calls.append((list(previous), new))
        self.calls += 1
        return self.repeat_map.get(new, False)


def example(qid, spans, question="What happens?", duration=60.0):
    """An anno.json example; spans = [(s0, s1, r1)], related span [s0, r1], gold text 'gold i'."""
    return {"video": f"{qid}.mp4", "question_id": qid, "duration": duration,
            "conversation": [{"role": "user", "content": question, "time": 0}],
            "answer": [{"role": "assistant", "content": f"gold {i}", "related_timespan": [s0, r1],
                        "reply_timespan": [s0, s1]} for i, (s0, s1, r1) in enumerate(spans)]}


# ----------------------------------------------------------------------------------------------
# area_ratio

def test_area_worked_examples_s2():
    # spec: span [10, 20], one reply at t=14 scored 2
    assert area_ratio([(4, 2)], 10, 2, omega=0) == pytest.approx(0.70)
    assert area_ratio([(4, 2)], 10, 2, omega=0.5) == pytest.approx(0.85)
    assert area_ratio([(4, 2)], 10, 2, omega=1) == pytest.approx(1.0)
    assert area_ratio([], 10, 2) == pytest.approx(0.25)
    assert area_ratio([(2, 1), (6, 2)], 10, 2, omega=0.5) == pytest.approx(0.825)
    assert area_ratio([(6, 2), (2, 1)], 10, 2, omega=0.5) == pytest.approx(0.825)  # order does not matter


def test_area_worked_examples_s4():
    assert area_ratio([(4, 4)], 10, 4) == pytest.approx(0.825)
    assert area_ratio([(10, 4)], 10, 4) == pytest.approx(0.5625)
    assert area_ratio([(0, 4)], 10, 4) == pytest.approx(1.0)
    assert area_ratio([], 10, 4) == pytest.approx(0.125)
    assert area_ratio([(2, 0)], 10, 4) == pytest.approx(0.0125)
    assert area_ratio([(2, 0)], 10, 4) < area_ratio([], 10, 4)  # a wrong reply is worse than silence


def test_area_is_a_step_function_not_interpolation():
    # with omega=0 a reply at x=5 scored 2: the first half stays at 0.5 (linear would give 1.25 avg)
    assert area_ratio([(5, 2)], 10, 2, omega=0) == pytest.approx((5 * 0.5 + 5 * 2) / 20)


def test_area_rejects_bad_spans_and_points():
    with pytest.raises(ValueError, match="span_len must be > 0"):
        area_ratio([], 0, 2)
    with pytest.raises(ValueError, match="span_len must be > 0"):
        area_ratio([(1, 2)], -3, 2)
    with pytest.raises(ValueError, match="must lie in"):
        area_ratio([(11, 2)], 10, 2)


def test_area_monotone_in_score_and_time():
    xs = [0, 0.5, 1, 2.5, 4, 7, 9.99, 10]
    for omega in (0, 0.25, 0.5, 0.75, 1):
        for x in xs:
            # a higher score never lowers the area
            vals = [area_ratio([(x, s)], 10, 4, omega) for s in range(5)]
            assert vals == sorted(vals)
            # an earlier reply never lowers the area, when it improves on the curve before it
            for s in (1, 2, 3, 4):  # any score above the 0.5 start
                for x_late in xs:
                    if x_late >= x:
                        assert area_ratio([(x, s)], 10, 4, omega) >= area_ratio([(x_late, s)], 10, 4, omega) - 1e-12
            # the same holds for a second, better reply after a first one at x=0
            for x_late in xs:
                if x_late >= x:
                    early = area_ratio([(0, 1), (x, 3)], 10, 4, omega)
                    assert early >= area_ratio([(0, 1), (x_late, 3)], 10, 4, omega) - 1e-12


# ----------------------------------------------------------------------------------------------
# the ProactiveVideoQA metric

def test_metric_docstring_example_and_turn_weighting():
    ex = example("v1", [(10, 20, 19), (30, 40, 39)])
    judge = ScriptedJudge({"A reply.": 2})
    assert pauc_metric([ex], {"v1": [(14, "A reply.")]}, judge) == pytest.approx((0.85 + 0.25) / 2)
    # turn-weighted: an example with 1 turn at 1.0 and one with 3 silent turns -> (1 + 3*0.25) / 4
    a, b = example("a", [(0, 10, 9)]), example("b", [(0, 10, 9), (20, 30, 29), (40, 50, 49)])
    preds = {"a": [(0, "A reply.")], "b": []}
    assert pauc_metric([a, b], preds, judge, omega=0) == pytest.approx((1.0 + 3 * 0.25) / 4)


def test_metric_judges_cumulatively_on_3_points_and_skips_exact_repeats():
    ex = example("v1", [(10, 20, 20)], question="What is added?")
    judge = ScriptedJudge({"Fish sauce.": 1, "Fish sauce. Sugar.": 2})
    preds = {"v1": [(16, "Sugar."), (12, "Fish sauce."), (14, "Fish sauce."), (18, SILENCE), (25, "Late.")]}
    value = pauc_metric([ex], preds, judge, omega=0.5)
    # judged "Fish sauce." (t=12), then the joined kept texts (t=16); t=14 repeat, NO REPLY, t=25 skipped
    assert [c[2] for c in judge.score_calls] == ["Fish sauce.", "Fish sauce. Sugar."]
    assert {c[3] for c in judge.score_calls} == {3}  # 3-point scale, S = 2
    assert judge.score_calls[0][:2] == ("What is added?", "gold 0")
    assert value == pytest.approx(0.825)  # the spec's two-reply example


def test_metric_overlapping_spans_count_one_reply_twice():
    ex = example("v1", [(10, 20, 20), (15, 25, 25)])
    judge = ScriptedJudge(default_score=2)
    value = pauc_metric([ex], {"v1": [(16, "Both.")]}, judge, omega=0)
    assert len(judge.score_calls) == 2  # one judge call per gold turn
    first = (6 * 0.5 + 4 * 2) / 20  # x = 6 in span 1
    second = (1 * 0.5 + 9 * 2) / 20  # x = 1 in span 2
    assert value == pytest.approx((first + second) / 2)


def test_metric_span_boundaries_are_inclusive():
    ex = example("v1", [(10, 20, 20)])
    judge = ScriptedJudge(default_score=2)
    assert pauc_metric([ex], {"v1": [(10, "At s0.")]}, judge, omega=0) == pytest.approx(1.0)
    assert pauc_metric([ex], {"v1": [(20, "At s1.")]}, judge, omega=0) == pytest.approx(0.25)  # counted, zero width
    assert len(judge.score_calls) == 2
    assert pauc_metric([ex], {"v1": [(20.01, "After.")]}, judge, omega=0) == pytest.approx(0.25)
    assert pauc_metric([ex], {"v1": [(9.99, "Before.")]}, judge, omega=0) == pytest.approx(0.25)
    assert len(judge.score_calls) == 2  # neither reply outside the span was judged


def test_prune_late_rule():
    assert prune_late([(12, 2), (17, 1), (18, 2)], r1=15) == [(12, 2), (18, 2)]
    assert prune_late([(12, 1), (14, 2), (16, 0)], r1=15) == [(12, 1), (14, 2)]
    assert prune_late([(12, 2), (14, 0)], r1=15) == [(12, 2), (14, 0)]  # on time: never pruned
    assert prune_late([(17, 0)], r1=15) == [(17, 0)]  # a single score is never pruned
    assert prune_late([(16, 1), (17, 0)], r1=15) == [(16, 1), (17, 0)]  # `last` starts at 0


def test_metric_applies_pruning_with_related_end():
    ex = example("v1", [(10, 20, 15)])  # event ends at r1 = 15
    judge = ScriptedJudge({"Right.": 2, "Right. Wrong.": 1})
    preds = {"v1": [(12, "Right."), (17, "Wrong.")]}
    # the late, lower score is pruned: the curve stays at 2 from x=2
    assert pauc_metric([ex], preds, judge, omega=0) == pytest.approx((2 * 0.5 + 8 * 2) / 20)
    # with the event still going at t=17 (r1 = 20) the drop counts
    ex2 = example("v1", [(10, 20, 20)])
    assert pauc_metric([ex2], preds, judge, omega=0) == pytest.approx((2 * 0.5 + 5 * 2 + 3 * 1) / 20)


def test_metric_drops_failed_judge_calls_instead_of_scoring_zero():
    ex = example("v1", [(10, 20, 20)])
    judge = ScriptedJudge({"Lost.": None})
    assert pauc_metric([ex], {"v1": [(12, "Lost.")]}, judge) == pytest.approx(0.25)  # as if silent; 0 would give 0.025


def test_metric_rejects_missing_prediction_and_bad_span():
    with pytest.raises(ValueError, match="no prediction for question_id 'v2'"):
        pauc_metric([example("v2", [(0, 5, 5)])], {}, ScriptedJudge())
    with pytest.raises(ValueError, match="s1 <= s0"):
        pauc_metric([example("v1", [(10, 10, 10)])], {"v1": []}, ScriptedJudge())


def test_duplicate_proportion():
    judge = ScriptedJudge(repeats={"Red again, bigger.": True, "Unsure.": None})
    preds = {"a": [(1, "A red circle."), (2, SILENCE), (3, "A red circle."), (4, "Red again, bigger.")],
             "b": [(1, "A blue square."), (5, "Unsure."), (6, "A green dot.")]}
    # a: first no, t=3 exact (no call), t=4 judged yes; b: first no, "Unsure." failed (dropped from
    # both counts), green no -> 2 repeats among 5 counted replies
    assert duplicate_proportion(preds, judge) == pytest.approx(2 / 5)
    assert [new for _, new in judge.repeat_calls] == ["Red again, bigger.", "Unsure.", "A green dot."]
    assert judge.repeat_calls[0][0] == ["A red circle."]  # earlier replies, unique
    assert duplicate_proportion({"a": [(1, SILENCE)]}, judge) == 0.0


def test_reply_stats_and_stream_rounds():
    ex = example("v1", [(10, 20, 19), (30, 40, 39), (50, 55, 54)], duration=57.5)
    stats = reward.reply_stats([ex], {"v1": [(13, "x"), (16, "y"), (35, "z"), (45, "w")]})
    assert stats == {"replies": 4, "replies_outside_spans": 1, "replies_per_example": 4.0,
                     "mean_delay": pytest.approx(4.0), "turns_with_reply": 2}  # delays 3 and 5; span 3 got none; 45 outside
    assert reward.stream_rounds(ex, fps=1) == 55  # to the last s1
    assert reward.stream_rounds(ex, fps=0.5) == 28  # ceil(27.5)
    ex["answer"][-1]["reply_timespan"] = [50, 60]  # past the video end: stop at the video
    assert reward.stream_rounds(ex, fps=1) == 57
    assert reward.stream_rounds(example("v2", [(0, 0.2, 0.2)]), fps=1) == 1  # at least one round


# ----------------------------------------------------------------------------------------------
# the MMDuet2 reward

FISH, SUGAR = "Fish sauce is poured into the pan.", "Someone stirs sugar into the pan."
GOLD = [{"content": "Fish sauce is added to the pan.", "question": "What is done?", "reply_timespan": [4, 10]},
        {"content": "Sugar is stirred in.", "question": "What is done?", "reply_timespan": [12, 20]}]
ROLLOUT = [(2, SILENCE), (4, SILENCE), (6, FISH), (8, SILENCE), (10, FISH), (12, SILENCE), (14, SILENCE),
           (16, SUGAR), (18, SILENCE), (20, SILENCE), (22, "The pan is washed.")]


def test_reward_worked_example():
    judge = ScriptedJudge({FISH: 4, SUGAR: 3})  # nothing judged a repeat
    r = mmduet2_reward(ROLLOUT, GOLD, judge)
    assert r["pauc"] == pytest.approx((0.854167 + 0.59375) / 2, abs=1e-6)
    assert r["rep"] == pytest.approx(-0.25)
    assert r["in_span"] == pytest.approx(-0.5)
    assert r["prefix"] == 0.0
    assert r["total"] == pytest.approx(1.421875)
    # each reply judged alone on 5 points; the t=10 exact repeat neither judged for PAUC nor for rep
    assert [(c[2], c[3]) for c in judge.score_calls] == [(FISH, 5), (SUGAR, 5)]
    assert [new for _, new in judge.repeat_calls] == [SUGAR, "The pan is washed."]
    assert mmduet2_reward(ROLLOUT, GOLD, judge, weights=(1, 0, 0, 0))["total"] == pytest.approx(r["pauc"])


def test_reward_skips_gold_turns_the_rollout_never_reached():
    judge = ScriptedJudge({FISH: 4})
    r = mmduet2_reward(ROLLOUT[:4], GOLD, judge)  # stops at t=8, before the sugar span starts (12)
    assert r["pauc"] == pytest.approx(0.854167, abs=1e-6)  # the sugar turn is not averaged in as 0.125
    r = mmduet2_reward(ROLLOUT[:6], GOLD, judge)  # reaches t=12 = s0: the sugar turn counts, silent
    assert r["pauc"] == pytest.approx((0.854167 + 0.125) / 2, abs=1e-6)
    empty = mmduet2_reward([], GOLD, judge)
    assert empty == {"pauc": 0.0, "rep": 0.0, "in_span": 0.0, "prefix": 0.0, "total": 0.0}


def test_reward_drops_failed_scores_and_counts_context_repeats():
    judge = ScriptedJudge({FISH: None}, repeats={SUGAR: None})
    r = mmduet2_reward([(6, FISH), (16, SUGAR)], GOLD, judge, context_replies=[FISH, SILENCE])
    assert r["pauc"] == pytest.approx((0.125 + (2 * 0.5 + 6 * 0) / 32) / 2)  # FISH dropped, SUGAR scored 0
    assert r["rep"] == pytest.approx(-1.0)  # FISH repeats the context; SUGAR's verdict failed: dropped
    assert judge.repeat_calls == [([FISH], SUGAR)]  # previous replies de-duplicated


def test_reward_in_span_counts_silent_turns_in_the_denominator():
    gold = [{"content": "x", "question": "q", "reply_timespan": [10, 20]}]
    turns = [(2, SILENCE), (4, SILENCE), (6, "Too early."), (12, SILENCE), (22, SILENCE)]
    r = mmduet2_reward(turns, gold, ScriptedJudge())
    assert r["in_span"] == pytest.approx(-1 / 4)  # outside: t=2, 4, 6, 22; one is a reply
    inside = mmduet2_reward([(12, SILENCE), (14, "In.")], gold, ScriptedJudge())
    assert inside["in_span"] == 0.0


def test_reward_prefix_threshold_is_50_characters():
    head = "x" * 50
    gold = [{"content": "x", "question": "q", "reply_timespan": [0, 100]}]
    judge = ScriptedJudge()
    r = mmduet2_reward([(1, head + " one"), (2, SILENCE), (3, head + " two")], gold, judge)
    assert r["prefix"] == pytest.approx(-1 / 3)  # over all turns, NO REPLY included
    r = mmduet2_reward([(1, head[:49] + "a one"), (3, head[:49] + "b two")], gold, judge)
    assert r["prefix"] == 0.0  # 49 shared characters
    r = mmduet2_reward([(3, head + " two")], gold, judge, context_replies=[head + " old"])
    assert r["prefix"] == -1.0  # the dialogue history counts


def test_reward_rejects_an_empty_span():
    bad = [{"content": "x", "question": "q", "reply_timespan": [5, 5]}]
    with pytest.raises(ValueError, match="s1 <= s0"):
        mmduet2_reward([(5, "Hi.")], bad, ScriptedJudge())


# ----------------------------------------------------------------------------------------------
# the offline judge and the parsers

def test_offline_judge_scores_toy_attributes():
    judge = OfflineJudge()
    gold = "A red circle appeared on the left."
    assert judge.score("q", gold, "A red circle on the left.", 5) == 4
    assert judge.score("q", gold, "A red circle on the left.", 3) == 2
    assert judge.score("q", gold, "A red square appeared on the left.", 5) == 3  # F1 2/3
    assert judge.score("q", gold, "A red square appeared on the left.", 3) == 1
    assert judge.score("q", gold, "A blue square on the right.", 5) == 0
    hedge = judge.score("q", gold, "red blue green yellow circle square left right", 5)
    assert hedge < 4  # listing every attribute is not full marks
    assert judge.score("q", "Yes.", "Yes.", 5) == 4  # no content word: plain words compared
    assert judge.calls == 7 and judge.cache_hits == 0 and judge.failures == 0
    with pytest.raises(ValueError, match="scale must be 3 or 5"):
        judge.score("q", gold, gold, 4)


def test_offline_judge_repeats_one_earlier_reply():
    judge = OfflineJudge()
    before = ["A red square on the right.", "A blue circle on the left."]
    assert judge.repeats(before, "The red square is on the right.")  # same attributes
    assert judge.repeats(before, "A blue circle on the left.")  # exact
    assert not judge.repeats(before, "A red circle on the right.")  # new combination of known words
    assert not judge.repeats([], "A red circle.")
    assert judge.calls == 4


def test_parsers_are_strict():
    assert reward.parse_score("3", 3) == 2
    assert reward.parse_score(" 2. partially", 3) == 1
    assert reward.parse_score("5", 5) == 4
    for bad in ("4", "0", "35", "Score: 3", "", None, "three", "1 3", "3\n1", "3/5", "2.5", "2 or 3"):
        assert reward.parse_score(bad, 3) is None  # several numbers are not the first of them, 2.5 is off the scale
    assert reward.parse_yes_no("Yes.") is True
    assert reward.parse_yes_no(" no") is False
    for bad in ("Nope", "I think yes", "", None):
        assert reward.parse_yes_no(bad) is None


# ----------------------------------------------------------------------------------------------
# the OpenAI judge through the real `openai` client, against a fake server on 127.0.0.1

class FakeServer:
    """An OpenAI-compatible /v1/chat/completions. `answer(user_text)` returns the answer text, an int
    (an HTTP error status), ('sleep', s) (answer after s seconds) or ('raw', content_type, body)
    (an HTTP 200 with exactly that body, e.g. a proxy's HTML page). With `echo_auth` the answers and
    error messages repeat the request's Authorization header, as some proxies do."""

    def __init__(self):
        self.requests = []
        self.answer = lambda text: "3"
        self.echo_auth = False
        self.release = threading.Event()  # set at teardown: a slow answer stops waiting
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                out = fake.answer(body["messages"][-1]["content"])
                if isinstance(out, tuple) and out[0] == "sleep":  # a slow server: answer after the client gave up
                    fake.release.wait(out[1])
                    out = "3"
                echo = f" (Authorization: {self.headers['Authorization']})" if fake.echo_auth else ""
                status, content_type = 200, "application/json"
                if isinstance(out, tuple) and out[0] == "raw":
                    _, content_type, data = out
                elif isinstance(out, int):
                    data = json.dumps({"error": {"message": "boom" + echo, "type": "server_error"}}).encode()
                    status = out
                else:
                    data = json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": out + echo}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and closed the connection

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_MODEL", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeServer()
    yield fake
    fake.release.set()
    fake.httpd.shutdown()
    fake.httpd.server_close()


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
    # in a concurrent run (the path `reward.py eval` takes) the failure is counted, not raised
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
# files and the CLI

def write_files(tmp_path, gold, pred_lines):
    g, p = tmp_path / "anno.json", tmp_path / "preds.jsonl"
    g.write_text(json.dumps(gold, indent=1))
    p.write_text("".join(line + "\n" for line in pred_lines))
    return str(g), str(p)


def pred_line(qid, turns):
    rows = [{"role": "user", "content": "<image>", "time": 0}]
    rows += [{"role": "assistant", "content": text, "time": t} for t, text in turns]
    return json.dumps({"question_id": qid, "model_response_list": rows})


def test_cli_eval_offline(tmp_path, capsys):
    gold = [example("v1", [(10, 20, 19), (30, 40, 39)]), example("v2", [(0, 10, 9)]), example("gone", [(0, 5, 5)])]
    gold[0]["answer"][0]["content"] = "A red circle appeared on the left."
    gold[1]["answer"][0]["content"] = "A blue square appeared."
    g, p = write_files(tmp_path, gold, [
        pred_line("v1", [(14, "A red circle on the left."), (16, "A red circle on the left."), (18, SILENCE)]),
        pred_line("v2", [(2, "A blue square.")])])
    out = tmp_path / "s.json"
    summary = reward.main(["eval", "--gold", g, "--pred", p, "--judge", "offline", "--json", str(out)])
    # v1 turn 1: full marks at x=4 (the t=16 repeat is skipped); turn 2 silent; v2: full marks at x=2
    expect = {"0.0": (14 / 20 + 0.25 + 17 / 20) / 3, "0.5": (17 / 20 + 0.25 + 18.5 / 20) / 3, "1.0": (1 + 0.25 + 1) / 3}
    for w, v in expect.items():
        assert summary["pauc"][w] == pytest.approx(100 * v)
    assert summary["duplicate_proportion"] == pytest.approx(1 / 3)  # the t=16 exact repeat
    assert (summary["examples"], summary["gold_turns"], summary["replies"]) == (2, 3, 3)
    assert summary["skipped"] == ["gone"]
    assert summary["judge_calls"] == 2 and summary["judge_failures"] == 0  # exact repeats need no call
    assert summary["diagnostics"]["mean_reply_delay_s"] == pytest.approx(3.0)
    assert summary["valid"] is True and summary["judge_failure_share"] == 0.0
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    text = capsys.readouterr().out
    assert "no prediction: gone" in text and "w=0.5 " in text and "our reconstruction" in text
    assert "not the paper's metric" in text


@pytest.mark.parametrize("gold_text, pred_text, message", [
    (None, '{"question_id": "v1", "model_response_list": []}\n{not json', "preds.jsonl line 2: not valid JSON"),
    (None, "", "no predictions"),
    (None, '{"question_id": "nope", "model_response_list": []}', "line 1: question_id 'nope' is not in the gold"),
    (None, '{"question_id": "v1"}', "line 1: expected"),
    (None, '{"question_id": "v1", "model_response_list": [{"role": "assistant", "content": "x"}]}', "numeric 'time'"),
    ("[]", None, "non-empty JSON list"),
    ('[\n{"question_id": 1,\n', None, "anno.json line 3: not valid JSON"),
    (json.dumps([example("v1", [(12, 10, 12)])]), None, "example 0 (v1) answer 0: reply_timespan [12, 10] has s1 <= s0"),
    (json.dumps([{"question_id": "v1"}]), None, "example 0: missing duration, conversation, answer"),
    # an unhashable question_id, or numbers that are not a time (Python's json reads NaN and Infinity)
    (None, '{"question_id": ["v1"], "model_response_list": []}', "preds.jsonl line 1: 'question_id' must be a string or an integer"),
    (None, '{"question_id": {"v": 1}, "model_response_list": []}', "preds.jsonl line 1: 'question_id' must be"),
    (json.dumps([dict(example("v1", [(0, 10, 10)]), question_id=["v1"])]), None, "anno.json example 0: 'question_id' must be"),
    (None, pred_line("v1", [(float("nan"), "x")]), "preds.jsonl line 1: an assistant turn needs a numeric 'time'"),
    (None, pred_line("v1", [(float("inf"), "x")]), "line 1: an assistant turn needs a numeric 'time'"),
    (None, pred_line("v1", [(-5, "x")]), "line 1: an assistant turn needs a numeric 'time'"),
    (None, pred_line("v1", [(True, "x")]), "line 1: an assistant turn needs a numeric 'time'"),
    (None, '{"question_id": "v1", "model_response_list": [{"content": "x", "time": 2}]}', "line 1: turn 0 needs a 'role'"),
    (None, '{"question_id": "v1", "model_response_list": ["A reply."]}', "line 1: turn 0 needs a 'role'"),
    (json.dumps([example("v1", [(0, float("inf"), 10)])]), None, "example 0 (v1) answer 0: 'reply_timespan'"),
    (json.dumps([example("v1", [(0, 10, float("nan"))])]), None, "example 0 (v1) answer 0: 'related_timespan'"),
])
def test_cli_bad_input_exits_with_one_line(tmp_path, gold_text, pred_text, message):
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])],
                       ['{"question_id": "v1", "model_response_list": []}'])
    if gold_text is not None:
        Path(g).write_text(gold_text)
    if pred_text is not None:
        Path(p).write_text(pred_text)
    with pytest.raises(SystemExit) as err:
        reward.main(["eval", "--gold", g, "--pred", p])
    text = str(err.value.code)
    assert text.startswith("reward.py: ") and message in text and "\n" not in text


@pytest.mark.parametrize("what", ["--json", "--cache"])
def test_cli_refuses_an_output_another_eval_is_writing(tmp_path, what):
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    out = tmp_path / "out.jsonl"
    argv = ["eval", "--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
            "--cache", str(out) if what == "--cache" else "", *(["--json", str(out)] if what == "--json" else [])]
    with another_run_writing(out) as pid:
        with pytest.raises(SystemExit) as err:
            reward.main(argv)
    assert str(err.value.code).startswith(f"reward.py: {out} is being written by another run (pid {pid} on ")
    assert not out.exists()  # nothing asked, nothing written


def test_cli_names_a_utf16_predictions_file_and_expands_home(tmp_path, monkeypatch):
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    Path(p).write_text(Path(p).read_text(), encoding="utf-16")  # as some Windows editors save it
    with pytest.raises(SystemExit) as err:
        reward.main(["eval", "--gold", g, "--pred", p])
    assert str(err.value.code) == f"reward.py: {p} is not UTF-8 text (saved as UTF-16?): save it as UTF-8"
    # "~" in every path, as typed --json=~/... or quoted (the shell leaves it)
    Path(p).write_text(pred_line("v1", [(2, "A reply.")]) + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    reward.main(["eval", "--gold", "~/anno.json", "--pred", "~/preds.jsonl", "--json", "~/s.json"])
    assert json.loads((tmp_path / "s.json").read_text())["examples"] == 1


def test_cli_unreachable_judge_exits_with_one_line(tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    with pytest.raises(SystemExit) as err:
        reward.main(["eval", "--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--cache", "",
                     "--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "0", "--workers", "2"])
    text = str(err.value.code)
    assert text.startswith("reward.py: judge endpoint") and "unreachable" in text and "\n" not in text


def gold_with(tmp_path, change):
    """anno.json holding example v1 after `change(example)`, for one bad field at a time."""
    ex = example("v1", [(0, 10, 10)])
    change(ex)
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([ex]))
    return path


def set_(*keys_value):
    """A change that sets ex[k1][k2]... = value."""
    *keys, last, value = keys_value

    def change(ex):
        for k in keys:
            ex = ex[k]
        ex[last] = value
    return change


NAN, INF = float("nan"), float("inf")
BAD_GOLD = [  # (change, the field named in the message)
    (set_("video", ""), "'video'"), (lambda ex: ex.pop("video"), "missing video"), (set_("video", 3), "'video'"),
    (set_("question_id", ["v1"]), "'question_id'"), (set_("question_id", {"v": 1}), "'question_id'"),
    (set_("question_id", True), "'question_id'"), (set_("question_id", None), "'question_id'"),
    (set_("duration", "abc"), "'duration'"), (set_("duration", None), "'duration'"), (set_("duration", True), "'duration'"),
    (set_("duration", NAN), "'duration'"), (set_("duration", INF), "'duration'"), (set_("duration", 0), "'duration'"),
    (set_("conversation", []), "'conversation'"), (set_("conversation", "What?"), "'conversation'"),
    (set_("conversation", 0, "role", None), "conversation 0: a turn needs"),
    (set_("conversation", ["What happens?"]), "conversation 0: a turn needs"),
    (set_("conversation", 0, "content", None), "conversation 0: a turn needs"),
    (set_("conversation", 0, "time", -1), "conversation 0: 'time'"), (set_("conversation", 0, "time", NAN), "conversation 0: 'time'"),
    (set_("conversation", 0, "time", "0"), "conversation 0: 'time'"),
    (lambda ex: ex["conversation"].append({"role": "user", "content": "Subtitle: Hi."}), "conversation 1: 'time'"),
    (set_("answer", {"content": "x"}), "'answer'"), (set_("answer", ["gold"]), "answer 0: needs"),
    (set_("answer", 0, "content", None), "answer 0: needs"),
    (set_("answer", 0, "reply_timespan", [NAN, 5]), "answer 0: 'reply_timespan'"),
    (set_("answer", 0, "reply_timespan", [0, INF]), "answer 0: 'reply_timespan'"),
    (set_("answer", 0, "reply_timespan", [True, 5]), "answer 0: 'reply_timespan'"),
    (set_("answer", 0, "reply_timespan", [0]), "answer 0: 'reply_timespan'"),
    (set_("answer", 0, "reply_timespan", [-1, 5]), "answer 0: reply_timespan [-1, 5] starts before the video"),
    (set_("answer", 0, "reply_timespan", [5, 5]), "answer 0: reply_timespan [5, 5] has s1 <= s0"),
    (set_("answer", 0, "related_timespan", [0, NAN]), "answer 0: 'related_timespan'"),
    (set_("answer", 0, "related_timespan", [6, 3]), "answer 0: related_timespan [6, 3] ends before it starts"),
    (set_("answer", 0, "question", 3), "answer 0: 'question'"),
]


@pytest.mark.parametrize("change, field", BAD_GOLD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_GOLD)])
def test_load_gold_names_file_example_and_field(tmp_path, change, field):
    path = gold_with(tmp_path, change)
    with pytest.raises(ValueError) as err:
        reward.load_gold(path)
    text = str(err.value)
    assert text.startswith(f"{path} example 0") and field in text and "\n" not in text


def test_load_gold_rejects_a_repeated_question_id_and_a_missing_file(tmp_path):
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([example(7, [(0, 10, 10)]), example(7, [(0, 10, 10)])]))
    with pytest.raises(ValueError, match=r"anno.json example 1 \(7\): question_id appears twice"):
        reward.load_gold(path)
    with pytest.raises(ValueError, match="nope.json: cannot read"):
        reward.load_gold(tmp_path / "nope.json")


def test_load_gold_accepts_every_shape_of_the_real_files(tmp_path):
    # shapes of the four ProactiveVideoQA parts and of what data.py writes, as found in their anno.json
    web = example("LGg.52.mp4", [(0.0, 4.07, 3.07), (3.1, 6.0, 5.0)], duration=12.866666666666667)
    ego = example("cc57-720-1080.mp4", [(20.29, 76.69, 75.69)], duration=360.17)
    ego["answer"][0]["type"] = "step"
    vad = example("Explosion016_x264.mp4", [(6.0, 16.0, 15.0)])
    vad["answer"][0]["num_captions"] = 1
    tv = dict(example("house.mp4%Q1", [(0.0, 7.49, 6.49)]), frame="house_frames/x", audio="house/x.mp3")
    tv["conversation"] += [{"role": "user", "content": "Subtitle: (Amber:)So, this is the story.", "time": 0.352},
                           {"role": "user", "content": "Subtitle: No.", "time": 22.307}]
    toy = example(3, [(1.0, 7.5, 6.5), (16.0, 20.0, 16.0)])  # an int id; nQnA: a second question at t=16
    toy["conversation"].append({"role": "user", "content": "Tell me the colour of each new shape.", "time": 16.0})
    toy["answer"][1].update(question="Tell me the colour of each new shape.", related_timespan=[0.0, 16.0])
    del toy["conversation"][0]["time"]  # the first turn is the question: its time may be left out
    path = tmp_path / "anno.json"
    path.write_text(json.dumps([web, ego, vad, tv, toy]))
    assert reward.load_gold(path) == [web, ego, vad, tv, toy]  # returned as read, extra keys kept


def test_cli_refuses_a_result_when_too_many_judge_calls_failed(server, tmp_path, capsys):
    server.answer = lambda text: 500  # a broken judge: every call fails
    g, p = write_files(tmp_path, [example(f"v{i}", [(0, 10, 10)]) for i in range(5)],
                       [pred_line(f"v{i}", [(2, f"Reply {i}.")]) for i in range(5)])
    out = tmp_path / "s.json"
    args = ["eval", "--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", server.url,
            "--cache", str(tmp_path / "c.jsonl"), "--retries", "0", "--json", str(out)]
    with pytest.raises(SystemExit) as err:
        reward.main(args)
    message = str(err.value.code)  # a string: Python prints it on stderr and exits with status 1
    assert message.startswith("reward.py: 5 of 5 judge calls failed") and "--max-failures" in message
    assert "\n" not in message
    printed = capsys.readouterr().out
    assert "NOT A RESULT" in printed and f"last judge failure: {server.url}: HTTP 500" in printed
    summary = json.loads(out.read_text())  # still written, flagged
    assert summary["valid"] is False and summary["judge_failures"] == 5 and summary["judge_failure_share"] == 1.0
    assert summary["judge_last_failure"].startswith(server.url)
    # the same run with every failure tolerated is a result (the dropped judgments count as silence)
    summary = reward.main(args + ["--max-failures", "1"])
    assert summary["valid"] is True and summary["pauc"]["0.5"] == pytest.approx(25.0)
    assert "NOT A RESULT" not in capsys.readouterr().out
    # the judge answers, but not one number ("1 3"): as failed, not scored, not cached
    server.answer = lambda text: "1 3"
    with pytest.raises(SystemExit, match="5 of 5 judge calls failed.*only the failed calls are asked again"):
        reward.main(args)
    # once it is fixed, the message holds: the rerun asks the failed calls again, and they are a result
    server.answer = lambda text: "3"
    summary = reward.main(args)
    assert summary["valid"] is True and summary["judge_calls"] == 5 and summary["judge_failures"] == 0


def test_gold_the_video_cannot_reach_is_said_per_example_kept_and_counted(tmp_path, capsys):
    ok = example("ok", [(0, 10, 10)], duration=30.0)
    odd = example("odd", [(0, 10, 10), (31, 33, 32)], duration=30.0)  # a reply span after the end
    odd["answer"][0]["content"] = "  "  # an empty gold answer
    odd["conversation"].append({"role": "user", "content": "And now?", "time": 35.0})  # a question after the end
    assert reward.gold_warnings(ok) == [] and reward.gold_warnings(ok, 30.4, turn=1.0) == []
    assert reward.gold_warnings(odd) == [
        "answer 0 is empty: every reply in its span is judged against nothing",
        "reply span 1 [31, 33] starts after the video ends (30 s): no reply can reach it, and it scores as silence",
        "conversation 1 at 35 s comes after the video ends (30 s): the model never sees it"]
    # with the video's own length: a duration off by more than a turn, and the spans held to the video
    assert reward.gold_warnings(ok, 8.0, turn=2.0) == [
        "'duration' is 30 s but the video lasts 8 s (another cut of it?): spans may not match what it shows"]
    # eval (no videos): kept, scored as defined (the unreachable span as silence), each one said and counted
    g, p = write_files(tmp_path, [ok, odd], [pred_line("ok", [(2, "gold 0")]), pred_line("odd", [(2, "A reply.")])])
    summary = reward.main(["eval", "--gold", g, "--pred", p, "--json", str(tmp_path / "s.json")])
    assert summary["examples"] == 2 and summary["gold_turns"] == 3
    assert summary["gold_warnings"] == {"odd": reward.gold_warnings(odd)}
    printed = capsys.readouterr().out
    assert "gold warning, odd: reply span 1 [31, 33] starts after the video ends" in printed
    assert "replies 2 (1 with gold warnings, above: scored as the benchmark defines them)" in printed


def test_load_predictions_treats_no_reply_as_silence(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(pred_line("v1", [(3, "  NO REPLY "), (1, "Hi. "), (5, "Bye.")]) + "\n\n")
    assert reward.load_predictions(p) == {"v1": [(1.0, "Hi."), (5.0, "Bye.")]}


REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-proj-Zq8TESTonly4tests0123456789"  # what a real key looks like; never sent anywhere but 127.0.0.1


def run_eval(args):
    """`python reward.py eval ARGS` in a subprocess with OPENAI_API_KEY set: the real stdout, stderr and exit code."""
    env = dict(os.environ, OPENAI_API_KEY=API_KEY, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "reward.py"), "eval", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("status", [401, 500])
def test_cli_never_prints_or_writes_the_api_key(server, tmp_path, status):
    server.echo_auth = True  # every answer and error body repeats "Authorization: Bearer <key>"
    server.answer = lambda text: "3" if text.endswith("answer: first") else status  # the repeat check fails too
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10), (20, 30, 30)])],
                       [pred_line("v1", [(2, "first"), (22, "second")])])
    cache, out = tmp_path / "judge.jsonl", tmp_path / "s.json"
    proc = run_eval(["--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", server.url,
                     "--cache", str(cache), "--json", str(out), "--retries", "0", "--workers", "1"])
    stdout, stderr = proc.communicate(timeout=60)
    written = [f.read_text() for f in (cache, out) if f.exists()]
    assert f"HTTP {status}" in (stdout + stderr) and "Bearer [redacted]" in (stdout + stderr)  # echoed, then redacted
    assert "Bearer [redacted]" in cache.read_text()  # the 200 answer to "first" was cached, redacted
    for text in [stdout, stderr, *written]:
        assert API_KEY not in text and API_KEY[:12] not in text


def test_ctrl_c_while_judging_exits_at_once_and_keeps_the_answers(server, tmp_path):
    server.answer = lambda text: "3" if "fast" in text else ("sleep", 60)  # the slow ones outlast the test
    g, p = write_files(tmp_path, [example(f"v{i}", [(0, 10, 10)]) for i in range(6)],
                       [pred_line(f"v{i}", [(2, f"{'fast' if i < 2 else 'slow'} reply {i}.")]) for i in range(6)])
    cache = tmp_path / "judge.jsonl"
    proc = run_eval(["--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", server.url,
                     "--cache", str(cache), "--workers", "2", "--timeout", "60", "--retries", "0"])
    try:
        deadline = time.monotonic() + 30
        while len(server.requests) < 4 and time.monotonic() < deadline:  # 2 answered, 2 slow ones in flight
            time.sleep(0.02)
        assert len(server.requests) == 4
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)  # before the fix: every queued request, 60 s each
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == 130 and elapsed < 5, (proc.returncode, elapsed, stderr[-500:])
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("reward.py: interrupted") and f"2 judge answers are in {cache}" in stderr
    assert len(cache.read_text().splitlines()) == 2 and len(server.requests) == 4  # nothing queued was started


# ----------------------------------------------------------------------------------------------
# several prediction files and the timeline page

class Elements(HTMLParser):
    """Every element of a page as {"tag", its attributes, "text": all the text inside it}."""

    def __init__(self, page):
        super().__init__()  # convert_charrefs: "&lt;" comes back as "<", as a browser shows it
        self.found, self.open = [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **dict(attrs), "text": ""}
        self.found.append(element)
        self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.found.append({"tag": tag, **dict(attrs), "text": ""})

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass  # void elements such as <meta> have no end tag

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data

    def of(self, tag, cls=None):
        return [el for el in self.found if el["tag"] == tag and (cls is None or el.get("class") == cls)]


EVIL = "<script>alert('x')</script> & \"quoted\""


def two_runs(tmp_path):
    """A gold file (v1: spans [10, 20] and [30, 40] in a 60 s video; v2: [0, 10] in 12 s) and two runs."""
    gold = [example("v1", [(10, 20, 19), (30, 40, 39)], duration=60), example("v2", [(0, 10, 9)], duration=12)]
    gold[0]["answer"][0]["content"] = "A red circle appeared on the left."
    gold[0]["answer"][1]["content"] = "A blue <b>square</b> & co."
    gold[1]["answer"][0]["content"] = "A green dot."
    sft = [pred_line("v1", [(14, "A red circle on the left."), (16, "A red circle on the left."), (25, SILENCE),
                            (50, EVIL)]), pred_line("v2", [(3, "A green dot.")])]
    g, p1 = write_files(tmp_path, gold, sft)
    p2 = tmp_path / "grpo.jsonl"  # GRPO: the same first reply (a free cache hit for a caching judge), one more
    p2.write_text(pred_line("v1", [(14, "A red circle on the left."), (33, "A blue square.")]) + "\n")
    return g, p1, str(p2)


def test_html_timeline_puts_spans_and_replies_on_the_time_axis_and_escapes_text(tmp_path):
    g, p1, p2 = two_runs(tmp_path)
    page = tmp_path / "t.html"
    reward.main(["eval", "--gold", g, "--pred", p1, p2, "--label", "SFT", "GRPO", "--html", str(page)])
    els = Elements(page.read_text())

    def at(t, end):  # the page's time axis: 0 s at PLOT_X0, the axis end PLOT_W pixels to the right
        return reward.PLOT_X0 + reward.PLOT_W * t / end

    svgs = els.of("svg")
    assert len(svgs) == 2  # one timeline per video
    # gold spans at s0, as wide as the span; v1's axis ends at its duration (60 s), v2's at 12 s
    spans = {el["text"].split(",")[0] + " " + el["text"].split("answer: ")[1]: el for el in els.of("rect", "span")}
    for name, s0, s1, end in [("gold 1 A red circle appeared on the left.", 10, 20, 60),
                              ("gold 2 A blue <b>square</b> & co.", 30, 40, 60), ("gold 1 A green dot.", 0, 10, 12)]:
        x = float(spans[name]["x"])
        assert x == pytest.approx(at(s0, end), abs=0.01)
        assert float(spans[name]["width"]) == pytest.approx(at(s1, end) - x, abs=0.01)
    # every reply of both runs is a dot at its time, with its text, run and note; NO REPLY is no dot
    dots = {el["text"].split(" (")[0]: el for el in els.of("circle", "reply")}
    expect = {"SFT at 14 s: A red circle on the left.": (14, 60, "gold 1: score 2 of 2"),
              "SFT at 16 s: A red circle on the left.": (16, 60, "gold 1: an exact repeat"),
              f"SFT at 50 s: {EVIL}": (50, 60, "outside every gold span"),
              "SFT at 3 s: A green dot.": (3, 12, "gold 1: score 2 of 2"),
              "GRPO at 14 s: A red circle on the left.": (14, 60, "gold 1: score 2 of 2"),
              "GRPO at 33 s: A blue square.": (33, 60, "gold 2: score")}
    assert set(dots) == set(expect)
    for text, (t, end, note) in expect.items():
        assert float(dots[text]["cx"]) == pytest.approx(at(t, end), abs=0.01)
        assert note in dots[text]["text"]
    # a run without a line for a video says so instead of drawing silence
    assert any(el["text"] == "(no prediction)" for el in els.of("text"))
    # escaped: no markup from the data became an element; nothing is fetched or run
    assert not els.of("script") and not els.of("b") and not els.of("link") and not els.of("img")
    assert not [el for el in els.found if "src" in el or "href" in el]
    # the PAUC table on top: one row per run
    rows = [el["text"] for el in els.of("tr")]
    assert rows[1].startswith("SFT") and rows[2].startswith("GRPO") and "valid" in rows[1]


def test_cli_several_pred_files_one_summary_each_and_shared_judge_calls_are_free(server, tmp_path, capsys):
    server.answer = lambda text: "No." if "New reply:" in text else "3"
    g, p1, p2 = two_runs(tmp_path)
    out = tmp_path / "s.json"
    judge = ["--judge", "openai", "--model", "m", "--base-url", server.url, "--cache", str(tmp_path / "c.jsonl")]
    result = reward.main(["eval", "--gold", g, "--pred", p1, p2, "--json", str(out), *judge])
    printed = capsys.readouterr().out
    assert f"== preds: {p1}" in printed and f"== grpo: {p2}" in printed and printed.count("PAUC x100") == 2
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["gold"] == g and list(result["runs"]) == ["preds", "grpo"] and result["runs"]["grpo"]["pred"] == p2
    sft, grpo = result["runs"]["preds"], result["runs"]["grpo"]
    assert (grpo["judge_calls"], grpo["judge_cache_hits"]) == (2, 1)  # the reply both runs share was asked once
    alone = reward.main(["eval", "--gold", g, "--pred", p1, *judge])  # one file: the summary as it always was
    assert alone["pauc"] == sft["pauc"] and "runs" not in alone
    assert "==" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--label", "A"], "2 --pred files need as many distinct names"),
    (["--label", "A", "A"], "2 --pred files need as many distinct names"),
])
def test_cli_labels_must_name_each_pred_file_once(tmp_path, extra, message):
    g, p1, p2 = two_runs(tmp_path)
    with pytest.raises(SystemExit) as err:
        reward.main(["eval", "--gold", g, "--pred", p1, p2, *extra])
    assert str(err.value.code).startswith("reward.py: ") and message in str(err.value.code)
