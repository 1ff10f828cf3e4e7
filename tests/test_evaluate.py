"""Tests for evaluate.py: the predictions loader, the command line (bad input, judge failures, secrets,
Ctrl-C, several prediction files) and the timeline page, run in-process and as a real subprocess, with the
offline judge or the fake OpenAI-compatible server of tests/conftest.py. No network, about ten seconds.

Run: python -m pytest tests/test_evaluate.py -q
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # evaluate.py lives in the repo root
import evaluate  # noqa: E402
import reward  # noqa: E402
from conftest import another_run_writing, example  # noqa: E402
from reward import SILENCE  # noqa: E402


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


def test_cli_streamingbench_two_runs_by_hand(tmp_path, capsys):
    """StreamingBench Proactive Output, told apart by its fields: the official time and answer accuracy for
    each --pred file (the first reply within +-2 s of the truth; the output in its text), no judge, no page."""
    gold = tmp_path / "questions_proactive.json"
    gold.write_text(json.dumps([{"video_path": "./videos/v.mp4", "questions": [
        {"task_type": "Proactive Output", "question": f'When {n} shows, output "{n}".', "time_stamp": "00:00:00",
         "ground_truth_time_stamp": f"00:00:{t:02d}", "ground_truth_output": n} for n, t in (("3", 10), ("7", 20))]}]))
    sft, grpo = tmp_path / "sft.jsonl", tmp_path / "grpo.jsonl"
    # SFT: "3" at 13 s (+3 s: late), silent on v_q1; GRPO: "3" at 12 s (+2 s: counted), "six" at 20 s (on time, wrong)
    sft.write_text(pred_line("v_q0", [(13, "It is 3.")]) + "\n" + pred_line("v_q1", [(30, SILENCE)]) + "\n")
    grpo.write_text(pred_line("v_q0", [(12, "3"), (14, "3 again")]) + "\n" + pred_line("v_q1", [(20, "six")]) + "\n")
    out = tmp_path / "sb.json"
    result = evaluate.main(["--gold", str(gold), "--pred", str(sft), str(grpo), "--label", "SFT", "GRPO", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "== SFT:" in printed and "== GRPO:" in printed and "1 with no reply" in printed
    s, g = result["runs"]["SFT"], result["runs"]["GRPO"]
    assert (s["time_accuracy"], s["answer_accuracy"], s["silent"]) == (0.0, 0.0, 1)
    assert (g["time_accuracy"], g["answer_accuracy"], g["time_correct"], g["answer_correct"]) == (100.0, 50.0, 2, 1)
    assert json.loads(out.read_text())["runs"]["GRPO"]["answer_accuracy"] == 50.0
    assert g["per_question"]["v_q0"]["reply_time"] == 12  # the first reply is the answer
    with pytest.raises(SystemExit, match="--html draws PAUC timelines, for a ProactiveVideoQA anno.json"):
        evaluate.main(["--gold", str(gold), "--pred", str(sft), "--html", str(tmp_path / "t.html")])


def test_cli_eval_offline(tmp_path, capsys):
    gold = [example("v1", [(10, 20, 19), (30, 40, 39)]), example("v2", [(0, 10, 9)]), example("gone", [(0, 5, 5)])]
    gold[0]["answer"][0]["content"] = "A red circle appeared on the left."
    gold[1]["answer"][0]["content"] = "A blue square appeared."
    g, p = write_files(tmp_path, gold, [
        pred_line("v1", [(14, "A red circle on the left."), (16, "A red circle on the left."), (18, SILENCE)]),
        pred_line("v2", [(2, "A blue square.")])])
    out = tmp_path / "s.json"
    summary = evaluate.main(["--gold", g, "--pred", p, "--judge", "offline", "--json", str(out)])
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
        evaluate.main(["--gold", g, "--pred", p])
    text = str(err.value.code)
    assert text.startswith("evaluate.py: ") and message in text and "\n" not in text


@pytest.mark.parametrize("what", ["--json", "--cache"])
def test_cli_refuses_an_output_another_eval_is_writing(tmp_path, what):
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    out = tmp_path / "out.jsonl"
    argv = ["--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
            "--cache", str(out) if what == "--cache" else "", *(["--json", str(out)] if what == "--json" else [])]
    with another_run_writing(out) as pid:
        with pytest.raises(SystemExit) as err:
            evaluate.main(argv)
    assert str(err.value.code).startswith(f"evaluate.py: {out} is being written by another run (pid {pid} on ")
    assert not out.exists()  # nothing asked, nothing written


def test_cli_names_a_utf16_predictions_file_and_expands_home(tmp_path, monkeypatch):
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    Path(p).write_text(Path(p).read_text(), encoding="utf-16")  # as some Windows editors save it
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--gold", g, "--pred", p])
    assert str(err.value.code) == f"evaluate.py: {p} is not UTF-8 text (saved as UTF-16?): save it as UTF-8"
    # "~" in every path, as typed --json=~/... or quoted (the shell leaves it)
    Path(p).write_text(pred_line("v1", [(2, "A reply.")]) + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    evaluate.main(["--gold", "~/anno.json", "--pred", "~/preds.jsonl", "--json", "~/s.json"])
    assert json.loads((tmp_path / "s.json").read_text())["examples"] == 1


def test_cli_unreachable_judge_exits_with_one_line(tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g, p = write_files(tmp_path, [example("v1", [(0, 10, 10)])], [pred_line("v1", [(2, "A reply.")])])
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--cache", "",
                     "--base-url", f"http://127.0.0.1:{port}/v1", "--retries", "0", "--workers", "2"])
    text = str(err.value.code)
    assert text.startswith("evaluate.py: judge endpoint") and "unreachable" in text and "\n" not in text


def test_cli_refuses_a_result_when_too_many_judge_calls_failed(server, tmp_path, capsys):
    server.answer = lambda text: 500  # a broken judge: every call fails
    g, p = write_files(tmp_path, [example(f"v{i}", [(0, 10, 10)]) for i in range(5)],
                       [pred_line(f"v{i}", [(2, f"Reply {i}.")]) for i in range(5)])
    out = tmp_path / "s.json"
    args = ["--gold", g, "--pred", p, "--judge", "openai", "--model", "m", "--base-url", server.url,
            "--cache", str(tmp_path / "c.jsonl"), "--retries", "0", "--json", str(out)]
    with pytest.raises(SystemExit) as err:
        evaluate.main(args)
    message = str(err.value.code)  # a string: Python prints it on stderr and exits with status 1
    assert message.startswith("evaluate.py: 5 of 5 judge calls failed") and "--max-failures" in message
    assert "\n" not in message
    printed = capsys.readouterr().out
    assert "NOT A RESULT" in printed and f"last judge failure: {server.url}: HTTP 500" in printed
    summary = json.loads(out.read_text())  # still written, flagged
    assert summary["valid"] is False and summary["judge_failures"] == 5 and summary["judge_failure_share"] == 1.0
    assert summary["judge_last_failure"].startswith(server.url)
    # the same run with every failure tolerated is a result (the dropped judgments count as silence)
    summary = evaluate.main(args + ["--max-failures", "1"])
    assert summary["valid"] is True and summary["pauc"]["0.5"] == pytest.approx(25.0)
    assert "NOT A RESULT" not in capsys.readouterr().out
    # the judge answers, but not one number ("1 3"): as failed, not scored, not cached
    server.answer = lambda text: "1 3"
    with pytest.raises(SystemExit, match="5 of 5 judge calls failed.*only the failed calls are asked again"):
        evaluate.main(args)
    # once it is fixed, the message holds: the rerun asks the failed calls again, and they are a result
    server.answer = lambda text: "3"
    summary = evaluate.main(args)
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
    # evaluate.py (no videos): kept, scored as defined (the unreachable span as silence), each one said and counted
    g, p = write_files(tmp_path, [ok, odd], [pred_line("ok", [(2, "gold 0")]), pred_line("odd", [(2, "A reply.")])])
    summary = evaluate.main(["--gold", g, "--pred", p, "--json", str(tmp_path / "s.json")])
    assert summary["examples"] == 2 and summary["gold_turns"] == 3
    assert summary["gold_warnings"] == {"odd": reward.gold_warnings(odd)}
    printed = capsys.readouterr().out
    assert "gold warning, odd: reply span 1 [31, 33] starts after the video ends" in printed
    assert "replies 2 (1 with gold warnings, above: scored as the benchmark defines them)" in printed


def test_load_predictions_treats_no_reply_as_silence(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(pred_line("v1", [(3, "  NO REPLY "), (1, "Hi. "), (5, "Bye.")]) + "\n\n")
    assert evaluate.load_predictions(p) == {"v1": [(1.0, "Hi."), (5.0, "Bye.")]}


REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-proj-Zq8TESTonly4tests0123456789"  # what a real key looks like; never sent anywhere but 127.0.0.1


def run_eval(args):
    """`python evaluate.py ARGS` in a subprocess with OPENAI_API_KEY set: the real stdout, stderr and exit code."""
    env = dict(os.environ, OPENAI_API_KEY=API_KEY, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *args], env=env, text=True,
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
    assert stderr.startswith("evaluate.py: interrupted") and f"2 judge answers are in {cache}" in stderr
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
    evaluate.main(["--gold", g, "--pred", p1, p2, "--label", "SFT", "GRPO", "--html", str(page)])
    els = Elements(page.read_text())

    def at(t, end):  # the page's time axis: 0 s at PLOT_X0, the axis end PLOT_W pixels to the right
        return evaluate.PLOT_X0 + evaluate.PLOT_W * t / end

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
    result = evaluate.main(["--gold", g, "--pred", p1, p2, "--json", str(out), *judge])
    printed = capsys.readouterr().out
    assert f"== preds: {p1}" in printed and f"== grpo: {p2}" in printed and printed.count("PAUC x100") == 2
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["gold"] == g and list(result["runs"]) == ["preds", "grpo"] and result["runs"]["grpo"]["pred"] == p2
    sft, grpo = result["runs"]["preds"], result["runs"]["grpo"]
    assert (grpo["judge_calls"], grpo["judge_cache_hits"]) == (2, 1)  # the reply both runs share was asked once
    alone = evaluate.main(["--gold", g, "--pred", p1, *judge])  # one file: the summary as it always was
    assert alone["pauc"] == sft["pauc"] and "runs" not in alone
    assert "==" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--label", "A"], "2 --pred files need as many distinct names"),
    (["--label", "A", "A"], "2 --pred files need as many distinct names"),
])
def test_cli_labels_must_name_each_pred_file_once(tmp_path, extra, message):
    g, p1, p2 = two_runs(tmp_path)
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--gold", g, "--pred", p1, p2, *extra])
    assert str(err.value.code).startswith("evaluate.py: ") and message in str(err.value.code)