"""Tests for data.py: dialogue construction, strict LLM parsing, the resumable build and the offline
mix (the toy world: tests/test_toy.py). Hermetic: no network; videos are tiny mp4s made in-process.

    .venv/bin/python -m pytest tests/test_data.py -q
"""
import json
import os
import random
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import mmduet2  # noqa: E402
import toy  # noqa: E402
from conftest import another_run_writing, write_video  # noqa: E402
from mmduet2 import IMAGE, SILENCE  # noqa: E402

# ----------------------------------------------------------------------------------------------
# A hand-written video: 30 s, paper settings (2 s frames, 2 per turn) → 15 frames, turns at
# 4, 8, ..., 28 and a last one-frame turn at 30.

DURATION = 30.0
SCENES = [
    {"start": 1.0, "end": 6.0, "caption": "c1"},    # reply span [1, 7]        → last turn inside: 4
    {"start": 9.0, "end": 14.5, "caption": "c2"},   # [9, 15.5]                → 12
    {"start": 14.6, "end": 16.5, "caption": "c3"},  # [14.6, 17.5]             → 16
    {"start": 15.0, "end": 16.8, "caption": "c4"},  # [15, 17.8]               → 16 (joined with c3)
    {"start": 17.2, "end": 18.5, "caption": "c5"},  # [17.2, 19.5]: no turn    → first after: 20
    {"start": 21.0, "end": 29.5, "caption": "c6"},  # [21, 30] (clipped)       → 30
    {"start": 23.0, "end": 25.0, "caption": "c7"},  # NO REPLY for the question: never answered
]
Q1 = {"question": "What happens?", "answers": ["a1", "a2", "a3", "a4", "a5", "a6", SILENCE]}


class FakeWriter:
    """Deterministic LLM stand-in that records what it was asked."""

    def __init__(self, qas=(Q1,)):
        self.qas, self.summaries, self.question_calls = list(qas), [], 0

    def questions(self, captions, n):
        self.question_calls += 1
        return self.qas

    def summarise(self, question, answers):
        self.summaries.append((question, list(answers)))
        return "SUM " + "|".join(answers)


def replies(messages):
    """{time: text} of the assistant turns that are not NO REPLY."""
    return {m["time"]: m["content"] for m in messages if m["role"] == "assistant" and m["content"] != SILENCE}


# ----------------------------------------------------------------------------------------------
# Dialogue construction

def test_place_follows_the_paper_rule_and_the_random_option():
    times = [4.0, 8.0, 12.0, 16.0]
    rng = random.Random(0)
    assert data.place(times, 5, 14, 0.0, rng) == 12.0       # end of the span
    assert data.place(times, 5, 7, 0.0, rng) == 8.0         # no turn inside → first turn after s0
    assert data.place(times, 17, 18, 0.0, rng) is None      # after the last turn
    picks = {data.place(times, 3, 16, 1.0, rng) for _ in range(200)}
    assert picks == {4.0, 8.0, 12.0, 16.0}                   # random: every turn inside the span, nothing else


def test_1qna_answers_sit_at_the_end_of_their_reply_spans():
    messages, conversation, gold = data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(0))
    times = mmduet2.turn_times(15, 2.0, 2)
    # one user + one assistant turn per turn time, same time; 15 frames in all, question first turn
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(times)
    assert [m["time"] for m in messages[::2]] == times == [m["time"] for m in messages[1::2]]
    assert sum(m["content"].count(IMAGE) for m in messages) == 15
    assert messages[0]["content"] == IMAGE * 2 + "What happens?" and messages[-2]["content"] == IMAGE
    assert replies(messages) == {4.0: "a1", 12.0: "a2", 16.0: "a3 a4", 20.0: "a5", 30.0: "a6"}
    assert conversation == [{"role": "user", "content": "What happens?", "time": 0.0}]
    # gold: the scene and the scene + 1 s (clipped to the video); the silent scene has no gold turn
    spans = [(g["content"], g["related_timespan"], g["reply_timespan"]) for g in gold]
    assert spans == [("a1", [1.0, 6.0], [1.0, 7.0]), ("a2", [9.0, 14.5], [9.0, 15.5]),
                     ("a3", [14.6, 16.5], [14.6, 17.5]), ("a4", [15.0, 16.8], [15.0, 17.8]),
                     ("a5", [17.2, 18.5], [17.2, 19.5]), ("a6", [21.0, 29.5], [21.0, 30.0])]
    assert all(g["question"] == "What happens?" for g in gold)


@pytest.mark.parametrize("interval,fpt", [(2.0, 2), (1.0, 1), (1.0, 2), (2.0, 1)])
def test_placement_matches_the_turn_grid_at_any_interval(interval, fpt):
    messages, _, gold = data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(0),
                                           interval, fpt)
    times = [m["time"] for m in messages[::2]]
    assert times == mmduet2.turn_times(int(DURATION / interval), interval, fpt)
    said = replies(messages)
    for g in gold:
        s0, s1 = g["reply_timespan"]
        inside = [t for t in times if s0 <= t <= s1]
        expected = inside[-1] if inside else min(t for t in times if t >= s0)
        assert g["content"] in said[expected].split(" ")


def test_history_answers_are_said_early_untrained_and_then_silent():
    """--history-frac: an answer also said at an earlier turn of its span, as untrained history; the turns
    after it are NO REPLY (trained), its gold entry's sft_time is that earlier turn, its spans unchanged."""
    plain = data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(0))
    messages, _, gold = data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(0), history_frac=1.0)
    def strip(answers):  # the gold entries without the SFT turn: spans, texts and questions
        return [{k: v for k, v in a.items() if k != "sft_time"} for a in answers]
    assert strip(gold) == strip(plain[2])
    said = {m["time"]: m for m in messages if m["role"] == "assistant" and m["content"] != SILENCE}
    end = {a["content"]: a["sft_time"] for a in plain[2]}  # the paper's end-of-span turns
    moved = [a for a in gold if a["sft_time"] < end[a["content"]]]
    times = mmduet2.turn_times(15, 2.0, 2)
    # an earlier turn of the span whose last frame (at t - 2 s) shows the event
    movable = [a for a in gold if any(a["reply_timespan"][0] <= t < end[a["content"]]
                                      and a["related_timespan"][0] <= t - 2 < a["related_timespan"][1] for t in times)]
    assert moved == movable and moved  # with --history-frac 1, every answer that has such a turn
    # a square from 7.5 s: turn 8 is in its span, but its last frame (6 s) has not shown it, so the answer stays at 12
    late = [{"start": 7.5, "end": 13.0, "caption": "c"}]
    _, _, late_gold = data.make_dialogue(DURATION, late, [(0.0, {"question": "q", "answers": ["a"]})], FakeWriter(),
                                         random.Random(0), history_frac=1.0)
    assert [a["sft_time"] for a in late_gold] == [12.0]
    for a in moved:
        s0, s1 = a["reply_timespan"]
        m = said[a["sft_time"]]
        assert s0 <= a["sft_time"] < end[a["content"]] and m["train"] is False and m["content"] == a["content"]
        assert end[a["content"]] not in said or a["content"] not in said[end[a["content"]]]["content"]
    assert all("train" not in m for t, m in said.items() if t not in {a["sft_time"] for a in moved})


def test_random_placement_stays_inside_the_span_and_is_seeded():
    runs = [data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(seed), random_frac=1.0)
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]  # same seed, same dialogue
    _, _, gold = runs[0]
    spans = lambda g: [{k: v for k, v in a.items() if k != "sft_time"} for a in g]  # noqa: E731
    assert spans(gold) == spans(data.make_dialogue(DURATION, SCENES, [(0.0, Q1)], FakeWriter(), random.Random(0))[2])
    for messages, _, gold in runs:  # each answer's sft_time is the turn the dialogue speaks it at (GRPO's context)
        assert all(a["content"] in replies(messages)[a["sft_time"]].split(" ") for a in gold)
        for t, text in replies(messages).items():
            for answer in text.split(" "):
                s0, s1 = next(g["reply_timespan"] for g in gold if g["content"] == answer)
                assert s0 <= t <= s1 or (answer == "a5" and t == 20.0)  # a5's span holds no turn: the fallback


def test_nqna_immediate_answer_when_a_question_is_asked_mid_video():
    scenes = [{"start": 1.0, "end": 6.0, "caption": "c1"}, {"start": 9.0, "end": 14.5, "caption": "c2"},
              {"start": 14.8, "end": 22.5, "caption": "c3"}, {"start": 25.0, "end": 28.0, "caption": "c4"}]
    q1 = {"question": "Q1?", "answers": ["a1", "a2", "a3", "a4"]}
    q2 = {"question": "Q2?", "answers": ["b1", "b2", "b3", SILENCE]}
    writer = FakeWriter()
    messages, conversation, gold = data.make_dialogue(DURATION, scenes, [(0.0, q1), (16.0, q2)], writer,
                                                      random.Random(0))
    # the new question rides on the turn at 16 s and is answered at once with a summary of the
    # scenes that already ended; c3, under way at 16 s, is answered for Q2 in its span
    assert messages[0]["content"] == IMAGE * 2 + "Q1?"
    assert next(m for m in messages if m["role"] == "user" and m["time"] == 16.0)["content"] == IMAGE * 2 + "Q2?"
    assert writer.summaries == [("Q2?", ["b1", "b2"])]
    assert replies(messages) == {4.0: "a1", 12.0: "a2", 16.0: "SUM b1|b2", 20.0: "b3"}  # a3, a4: Q1 is over
    assert conversation == [{"role": "user", "content": "Q1?", "time": 0.0},
                            {"role": "user", "content": "Q2?", "time": 16.0}]
    immediate = next(g for g in gold if g["content"] == "SUM b1|b2")
    assert immediate["related_timespan"] == [0.0, 16.0] and immediate["reply_timespan"] == [16.0, 20.0]
    assert immediate["question"] == "Q2?"
    b3 = next(g for g in gold if g["content"] == "b3")
    assert b3["related_timespan"] == [14.8, 22.5] and b3["reply_timespan"] == [16.0, 23.5]  # cut to the question
    assert [g["content"] for g in gold] == ["a1", "a2", "SUM b1|b2", "b3"]


def test_no_immediate_answer_when_nothing_has_ended_yet():
    writer = FakeWriter()
    q2 = {"question": "Q2?", "answers": ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]}
    messages, _, gold = data.make_dialogue(DURATION, SCENES, [(0.0, Q1), (4.0, q2)], writer, random.Random(0))
    assert writer.summaries == []                     # c1 ends at 6 s: nothing to summarise at 4 s
    assert replies(messages)[4.0] == "b1"              # c1 is due for Q2 (span cut to [4, 7])
    assert not any(g["question"] == "What happens?" for g in gold)  # Q1 was replaced before any reply


def test_choose_asks_one_or_several_questions():
    times = mmduet2.turn_times(15, 2.0, 2)
    silent = {"question": "Nobody answers?", "answers": [SILENCE] * 7}
    q2 = {"question": "Q2?", "answers": ["b"] * 7}
    for seed in range(20):
        one = data.choose_asks([silent, Q1], times, False, random.Random(seed))
        assert one == [(0.0, Q1)]                   # 1QnA: only a question some scene answers
        many = data.choose_asks([silent, Q1, q2], times, True, random.Random(seed))
        assert many[0][0] == 0.0 and len(many) == 3
        later = [t for t, _ in many[1:]]
        assert later == sorted(set(later)) and all(t in times[1:-1] for t in later)
    with pytest.raises(ValueError, match="no question is answered"):
        data.choose_asks([silent], times, False, random.Random(0))


# ----------------------------------------------------------------------------------------------
# The LLM boundary: strict parsing, re-asks, reports

def qa_json(n_questions, n_answers):
    return json.dumps({"questions": [{"question": f"Q{i}?", "answers": [f"a{j}" for j in range(n_answers)]}
                                     for i in range(n_questions)]})


def test_parse_questions_is_strict():
    assert data.parse_questions(qa_json(2, 3), 2, 3)[1] == {"question": "Q1?", "answers": ["a0", "a1", "a2"]}
    assert data.parse_questions("```json\n" + qa_json(2, 3) + "\n```", 2, 3)[0]["question"] == "Q0?"
    loose = json.dumps({"questions": [{"question": "Q?", "answers": ["No reply.", " yes "]}]})
    assert data.parse_questions(loose, 1, 2)[0]["answers"] == [SILENCE, "yes"]
    for text, n_q, n_s, error in [
        ("Sure! Here are your questions:", 2, 3, "not JSON"),
        (qa_json(2, 2), 2, 3, "2 answers for 3 scenes"),
        (qa_json(3, 3), 2, 3, "expected 2 questions, got 3"),
        ('[{"question": "Q?", "answers": ["a"]}]', 1, 1, "expected an object"),
        ('{"questions": [{"question": "", "answers": ["a"]}]}', 1, 1, "no 'question' text"),
        ('{"questions": [{"question": "Q?", "answers": ["a", ""]}]}', 1, 2, "non-empty strings"),
    ]:
        with pytest.raises(ValueError, match=error):
            data.parse_questions(text, n_q, n_s)


class FakeClient:
    """llm.LLMClient's interface: ask(instruction, text) -> str | None, answers given in order."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def ask(self, instruction, text):
        self.prompts.append(text)
        return self.answers.pop(0)


def test_llm_writer_reasks_a_malformed_answer_with_a_new_prompt():
    client = FakeClient(["not json at all", qa_json(2, 1), qa_json(2, 3)])
    qas = data.LLMWriter(client, retries=2).questions(["x", "y", "z"], 2)
    assert [qa["question"] for qa in qas] == ["Q0?", "Q1?"]
    assert len(client.prompts) == 3
    # the client caches by prompt: each re-ask must differ and say what was wrong
    assert len(set(client.prompts)) == 3 and "not JSON" in client.prompts[1] and "1 answers for 3" in client.prompts[2]


def test_llm_writer_reports_after_the_retries_and_on_endpoint_failure():
    client = FakeClient([qa_json(2, 1)] * 3)
    with pytest.raises(ValueError, match="still malformed after 3 tries: question 1 has 1 answers for 3 scenes"):
        data.LLMWriter(client, retries=2).questions(["x", "y", "z"], 2)
    assert len(client.prompts) == 3
    with pytest.raises(ValueError, match="no answer from the LLM endpoint"):
        data.LLMWriter(FakeClient([None]), retries=2).summarise("Q?", ["a", "b"])
    summary = data.LLMWriter(FakeClient(["NO REPLY", "  A and B.  "])).summarise("Q?", ["A.", "B."])
    assert summary == "A and B."  # a silent summary is rejected and re-asked


# ----------------------------------------------------------------------------------------------
# The resumable build and its error reports

def write_scenes(tmp_path, lines):
    (tmp_path / "videos").mkdir(exist_ok=True)
    for i in range(5):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(b"")  # build never decodes: existence is enough
    path = tmp_path / "scenes.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def record(i, scenes=SCENES[:3], duration=DURATION):
    return {"video": f"videos/v{i}.mp4", "duration": duration, "scenes": scenes}


def test_build_writes_both_formats_and_resumes(tmp_path):
    scenes = write_scenes(tmp_path, [record(0), record(1), record(2)])
    out = tmp_path / "out"
    writer = FakeWriter([{"question": "Q?", "answers": ["a1", "a2", "a3"]},
                         {"question": "R?", "answers": ["b1", "b2", SILENCE]}])
    counts = data.build(scenes, out, writer, nqna_frac=0.5, seed=3)
    assert counts["built"] == 3 and writer.question_calls == 3
    dialogues = [json.loads(l) for l in (out / "sft.jsonl").read_text().splitlines()]
    anno = json.loads((out / "anno.json").read_text())
    assert [d["id"] for d in dialogues] == [a["question_id"] for a in anno] == ["v0", "v1", "v2"]
    d, a = dialogues[0], anno[0]
    assert (d["video"], d["interval"], d["frames_per_turn"]) == ("../videos/v0.mp4", 2.0, 2)
    assert os.path.isfile(out / d["video"]) and os.path.isfile(os.path.join(out, "videos", a["video"]))
    assert a["video"] == str(tmp_path / "videos" / "v0.mp4")  # outside out/videos: an absolute path
    assert a["duration"] == DURATION and a["conversation"][0]["time"] == 0.0
    assert all(m["role"] != "system" for m in d["messages"])  # the trainer adds the proactive prompt
    before = (out / "sft.jsonl").read_bytes()

    # a second run skips every built video: no LLM call, nothing appended
    assert data.build(scenes, out, writer, nqna_frac=0.5, seed=3)["done_before"] == 3
    assert writer.question_calls == 3 and (out / "sft.jsonl").read_bytes() == before

    # an interruption: the last video lost, the one before cut mid-line → both rebuilt, identically
    lines = before.decode().splitlines(keepends=True)
    (out / "sft.jsonl").write_text(lines[0] + lines[1][:40])
    assert data.build(scenes, out, writer, nqna_frac=0.5, seed=3)["built"] == 2
    assert (out / "sft.jsonl").read_bytes() == before
    assert json.loads((out / "anno.json").read_text()) == anno  # journal duplicates collapse

    with pytest.raises(ValueError, match=r"built with other settings \(random_frac: 0.0 there, 1.0 now\)"):
        data.build(scenes, out, writer, random_frac=1.0, nqna_frac=0.5, seed=3)
    # a setting only the earlier build recorded counts too (history_frac is recorded only when used)
    data.build(scenes, tmp_path / "history", writer, nqna_frac=0.5, seed=3, history_frac=0.5)
    with pytest.raises(ValueError, match=r"other settings \(history_frac: 0.5 there, None now\)"):
        data.build(scenes, tmp_path / "history", writer, nqna_frac=0.5, seed=3)
    assert not list(out.glob("*.tmp"))  # anno.json written whole, then renamed (runs.write_atomic)


def test_build_with_workers_writes_what_one_worker_writes_in_input_order(tmp_path, capsys):
    """Videos built concurrently (llm.imap) finish in any order; the files keep the input order, byte for byte
    what one worker writes, and a video whose LLM step fails is reported and skipped, not fatal."""
    bad = [dict(SCENES[0], caption="FAIL")] + SCENES[1:3]
    scenes = write_scenes(tmp_path, [record(0), record(1, bad), record(2), record(3)])
    qas = [{"question": "Q?", "answers": ["a1", "a2", "a3"]}]
    lock = threading.Lock()

    class SlowWriter(FakeWriter):  # the first video asked answers last
        def questions(self, captions, n):
            if captions[0] == "FAIL":
                raise ValueError("LLM answer still malformed")
            with lock:
                self.question_calls += 1
                first = self.question_calls == 1
            time.sleep(0.3 if first else 0.0)
            return self.qas

    files = {}
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        counts = data.build(scenes, out, SlowWriter(qas), nqna_frac=0.5, seed=3, workers=workers)
        assert (counts["built"], counts["failed"]) == (3, 1)
        assert "line 2 (v1): LLM answer still malformed; skipped" in capsys.readouterr().err
        files[workers] = [(out / name).read_bytes() for name in ("sft.jsonl", "anno.json")]
    assert [json.loads(line)["id"] for line in files[4][0].decode().splitlines()] == ["v0", "v2", "v3"]
    assert files[4] == files[1]


def test_a_second_build_into_the_same_folder_is_refused(tmp_path):
    scenes = write_scenes(tmp_path, [record(0)])
    out = tmp_path / "out"
    with another_run_writing(out, folder=True) as pid:
        with pytest.raises(SystemExit) as e:
            data.main(["build", "--scenes", str(scenes), "--out", str(out), "--llm", "toy"])
    assert str(e.value.code).startswith(f"data.py: {out} is being written by another run (pid {pid} on ")
    assert os.listdir(out) == [".lock"]  # nothing written (the lock file holds the other run's pid)


def test_build_nqna_fraction_is_respected(tmp_path):
    scenes = write_scenes(tmp_path, [record(i) for i in range(5)])
    qas = [{"question": "Q?", "answers": ["a1", "a2", "a3"]}, {"question": "R?", "answers": ["b1", "b2", "b3"]}]
    for frac, n_questions in ((0.0, 1), (1.0, 2)):
        out = tmp_path / f"out{frac}"
        assert data.build(scenes, out, FakeWriter(qas), nqna_frac=frac)["nqna"] == 5 * (n_questions - 1)
        assert all(len(a["conversation"]) == n_questions for a in json.loads((out / "anno.json").read_text()))


def test_bad_input_lines_are_reported_with_their_line_number(tmp_path, capsys):
    caption = toy.caption("red")
    good = {"start": 2.0, "end": 8.0, "caption": caption}
    scenes = write_scenes(tmp_path, [
        record(0, [good]),                                                     # line 1: fine
        '{"video": "videos/v1.mp4", "duration": 30',                           # line 2: cut JSON
        record(2, [{"start": 9.0, "end": 9.0, "caption": caption}]),           # line 3: end <= start
        record(3, [{"start": 25.0, "end": 31.0, "caption": caption}]),         # line 4: past the end
        {"video": "videos/missing.mp4", "duration": 30.0, "scenes": [good]},   # line 5: no such video
        record(4, [{"start": 2.0, "end": 8.0, "caption": "A dog barks."}]),    # line 6: the toy LLM cannot read it
    ])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        data.main(["build", "--scenes", str(scenes), "--out", str(out), "--llm", "toy"])
    assert str(stop.value).startswith("data.py: 4 bad input lines and 1 failed videos skipped")
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err
    assert "line 3: scene 1 ends at 9.0 s, not after its start 9.0 s" in err
    assert "line 4: scene 1 [25.0, 31.0] lies outside the video [0, 30.0]" in err
    assert "line 5: video not found" in err
    assert "line 6 (v4): the toy writer reads only toy captions" in err
    assert [json.loads(l)["id"] for l in (out / "sft.jsonl").read_text().splitlines()] == ["v0"]

    with pytest.raises(SystemExit, match="^data.py: scenes file not found: .*nope.jsonl$"):
        data.main(["build", "--scenes", str(tmp_path / "nope.jsonl"), "--out", str(out), "--llm", "toy"])
    with pytest.raises(SystemExit):  # argparse: a placement that is neither end, random nor a probability
        data.main(["build", "--scenes", str(scenes), "--out", str(out), "--placement", "late"])
    assert data.placement_arg("end") == 0.0 and data.placement_arg("random") == 1.0 and data.placement_arg("0.3") == 0.3


def test_a_bad_flag_is_one_line(capsys):
    """A sub-command's bad flag is one line on stderr, exit 2, as the main parser's (not argparse's usage block)."""
    for argv, message in ((["toy", "--out", "x", "--n-train", "many"], "argument --n-train: invalid int value: 'many'"),
                          (["toy", "--out", "x", "--placement", "late"], "argument --placement: expected end, random"),
                          (["toy"], "the following arguments are required: --out")):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"data.py: {message}") and err.count("\n") == 1, err
        assert err.endswith("(data.py --help lists the flags)\n")


# ----------------------------------------------------------------------------------------------
# The offline mix

def test_offline_dialogue_samples_exactly_its_frames(tmp_path):
    d = data.offline_dialogue("x", "v.mp4", 30.0, "What is shown?", "A red square.")
    assert [m["role"] for m in d["messages"]] == ["system", "user", "assistant"]
    assert d["messages"][0]["content"] == mmduet2.DEFAULT_SYSTEM_PROMPT
    assert d["messages"][1]["content"] == IMAGE * 16 + "What is shown?"
    assert int(30.0 / d["interval"] + 1e-6) == 16 and d["frames_per_turn"] == 16  # read_frames yields 16
    assert data.offline_dialogue("y", "v.mp4", 3.0, "Q?", "A.")["messages"][1]["content"].count(IMAGE) == 6

    video = write_video(tmp_path / "v.mp4", seconds=30)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"video": str(video), "question": "What colour?", "answer": "Red."}) + "\n"
                  + json.dumps({"video": str(video), "answer": "A caption."}) + "\n"
                  + json.dumps({"video": "missing.mp4", "question": "Q?", "answer": "A."}) + "\n")
    out = tmp_path / "sub" / "offline.jsonl"
    assert data.build_offline(qa, out) == (2, 1)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows[1]["messages"][1]["content"].endswith(data.CAPTION_QUESTION)
    messages, frames = mmduet2.load_dialogue(rows[0], root=str(out.parent))  # the hub reads it back
    assert len(frames) == 16 and messages[-1]["content"] == "Red."
