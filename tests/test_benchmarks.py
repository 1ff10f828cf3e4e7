"""benchmarks.py: StreamingBench Proactive Output and offline QA, loaded and scored as their protocols say,
each score against a case worked out by hand (docs/benchmarks.md). No model, no video.

    .venv/bin/python -m pytest tests/test_benchmarks.py -q
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks  # noqa: E402


def sb_question(question, start, gt, output, task="Proactive Output"):
    return {"task_type": task, "question": question, "time_stamp": start, "ground_truth_time_stamp": gt,
            "ground_truth_output": output, "required_ability": "working memory"}


def sb_file(tmp_path, entries):
    path = tmp_path / "questions_proactive.json"
    path.write_text(json.dumps(entries))
    return str(path)


# StreamingBench's own example question (its README's questions_proactive.json), and a second video
SB = [{"time": "[0:00:00 - 0:00:30]", "video_categories": "basketball", "video_path": "./videos/sample_17_proactive.mp4",
       "questions": [sb_question('When the scoreboard shows 3 points for USA, output "3".', "00:00:20", "00:00:29", "3")]},
      {"video_path": "./videos/cook.mp4", "questions": [sb_question('When the egg cracks, output "egg".', "00:00:00", "00:01:05", "egg"),
                                                        sb_question('When salt goes in, output "salt".', "00:01:10", "00:01:12", "salt")]}]


def test_seconds_and_hms():
    assert benchmarks.seconds("00:00:29") == 29 and benchmarks.seconds("01:02:03") == 3723 and benchmarks.seconds("1:05") == 65
    assert benchmarks.hms(29) == "00:00:29" and benchmarks.hms(3723) == "01:02:03"
    for bad in ("", "1:2:3:4", "00:0a:10", 29):
        with pytest.raises(ValueError, match="expected a time as HH:MM:SS"):
            benchmarks.seconds(bad)


def test_detect_tells_the_three_files_apart(tmp_path):
    sb = sb_file(tmp_path, SB)
    (tmp_path / "anno.json").write_text(json.dumps([{"video": "a.mp4", "question_id": "q", "conversation": [], "answer": []}]))
    (tmp_path / "offline.jsonl").write_text(json.dumps({"id": "o", "messages": []}) + "\n" + json.dumps({"id": "p", "messages": []}) + "\n")
    (tmp_path / "junk.txt").write_text("not json\n")
    assert benchmarks.detect(sb) == "streamingbench"
    assert benchmarks.detect(str(tmp_path / "anno.json")) == "proactivevideoqa"
    assert benchmarks.detect(str(tmp_path / "offline.jsonl")) == "offline"
    # anything else is left to the ProactiveVideoQA loader, whose one-line errors say what is wrong with it
    assert benchmarks.detect(str(tmp_path / "junk.txt")) == "proactivevideoqa"


def test_load_streamingbench_names_and_reads_every_question(tmp_path):
    qs = benchmarks.load_streamingbench(sb_file(tmp_path, SB))
    assert [q["question_id"] for q in qs] == ["sample_17_proactive_q0", "cook_q0", "cook_q1"]
    assert qs[0] == {"question_id": "sample_17_proactive_q0", "video": "./videos/sample_17_proactive.mp4",
                     "question": 'When the scoreboard shows 3 points for USA, output "3".', "start": 20.0,
                     "gt_time": 29.0, "gt_output": "3", "task_type": "Proactive Output"}
    assert (qs[1]["start"], qs[1]["gt_time"]) == (0.0, 65.0)
    # the same video named by two entries: its questions are counted on, never named twice
    twice = benchmarks.load_streamingbench(sb_file(tmp_path, [SB[1], SB[1]]))
    assert [q["question_id"] for q in twice] == ["cook_q0", "cook_q1", "cook_q2", "cook_q3"]


@pytest.mark.parametrize("entries, message", [
    ({"questions": []}, "expected a JSON list of videos"),
    ([{"questions": []}], 'entry 0: expected {"video_path": "...", "questions": [...]}'),
    ([{"video_path": "v.mp4", "questions": [sb_question("Q?", "00:00:00", "00:00:05", "x", task="Object Recognition")]}],
     "only 'Proactive Output' questions are scored here"),
    ([{"video_path": "v.mp4", "questions": [{"question": "Q?", "time_stamp": "00:00:00"}]}],
     "question 0: needs ground_truth_time_stamp, ground_truth_output"),
    ([{"video_path": "v.mp4", "questions": [sb_question("Q?", "00:00:00", "five", "x")]}], "expected a time as HH:MM:SS"),
    ([{"video_path": "v.mp4", "questions": [sb_question("Q?", "00:00:09", "00:00:09", "x")]}],
     "ground_truth_time_stamp 00:00:09 is not after time_stamp 00:00:09"),
])
def test_a_bad_streamingbench_file_is_one_line(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{").replace("(", r"\(")):
        benchmarks.load_streamingbench(sb_file(tmp_path, entries))


def test_frames_streamed_end_where_the_official_polling_ends():
    q = {"start": 20.0, "gt_time": 29.0}
    # to gt + 4 = 33 s: 1 s frames -> 13 (turns at 21 .. 33); 2 s -> 6 (the last turn at 32, not past 33)
    assert benchmarks.sb_frames(q, 1.0) == 13 and benchmarks.sb_frames(q, 2.0) == 6
    assert benchmarks.sb_frames({"start": 0.0, "gt_time": 1.0}, 0.5) == 10


def test_streamingbench_scoring_by_hand():
    """gt 29 s, output "3". The official rule: the first reply, |t - gt| <= 2 s for time; and "3" in it for the answer."""
    cases = {  # question_id: (replies, time correct, answer correct)
        "plus-2": ([(31.0, "It shows 3.")], True, True),      # +2 s: counted (the bound is inclusive)
        "minus-2": ([(27.0, "3")], True, True),               # -2 s: counted
        "plus-3": ([(32.0, "3")], False, False),              # +3 s: not
        "wrong-text": ([(29.0, "three")], True, False),       # the right time, the output not in the text
        "silent": ([], False, False),                         # no reply: neither
        "first-counts": ([(25.0, "Now."), (29.0, "3")], False, False),  # the first reply (at -4 s) is the answer
        "same-time": ([(30.0, "USA has 3"), (30.0, "x")], True, True),  # two replies at one time: the first in the file
    }
    questions = [{"question_id": qid, "gt_time": 29.0, "gt_output": "3"} for qid in cases]
    summary, verdicts = benchmarks.score_streamingbench(questions, {qid: c[0] for qid, c in cases.items()})
    assert {qid: (v["time_correct"], v["answer_correct"]) for qid, v in verdicts.items()} == \
        {qid: (c[1], c[2]) for qid, c in cases.items()}
    assert verdicts["first-counts"]["reply_time"] == 25.0 and verdicts["silent"]["reply_time"] is None
    # 7 questions: on time plus-2, minus-2, wrong-text, same-time = 4; right answers plus-2, minus-2, same-time = 3
    assert (summary["examples"], summary["time_correct"], summary["answer_correct"], summary["silent"]) == (7, 4, 3, 1)
    assert summary["time_accuracy"] == pytest.approx(400 / 7) and summary["answer_accuracy"] == pytest.approx(300 / 7)
    # offsets of the 6 first replies: +2, -2, +3, 0, -4, +1 -> mean 0
    assert summary["mean_first_reply_offset_s"] == pytest.approx(0.0)


def test_the_answer_check_is_the_officials_case_sensitive_substring():
    questions = [{"question_id": "q", "gt_time": 10.0, "gt_output": "Red"}]
    for text, right in (("Red.", True), ("A Red square", True), ("red.", False), ("A red square appeared.", False)):
        assert benchmarks.score_streamingbench(questions, {"q": [(10.0, text)]})[1]["q"]["answer_correct"] is right


def offline_file(tmp_path, lines):
    path = tmp_path / "offline.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def offline_line(qid, answer, system="You are a helpful assistant."):
    messages = [{"role": "user", "content": "<image><image>List the colours.", "time": 20.0},
                {"role": "assistant", "content": answer, "time": 20.0}]
    return {"id": qid, "video": "videos/v.mp4", "interval": 10.0, "frames_per_turn": 2,
            "messages": ([{"role": "system", "content": system}] if system else []) + messages}


def test_load_offline(tmp_path):
    (ex,) = benchmarks.load_offline(offline_file(tmp_path, [offline_line("o1", "Red, blue.")]))
    assert {k: ex[k] for k in ("question_id", "system", "question", "answer", "frames", "time")} == \
        {"question_id": "o1", "system": "You are a helpful assistant.", "question": "List the colours.",
         "answer": "Red, blue.", "frames": 2, "time": 20.0}
    assert benchmarks.load_offline(offline_file(tmp_path, [offline_line("o1", "x", system=None)]))[0]["system"] is None
    for lines, message in (([offline_line("o", "x"), offline_line("o", "y")], "id 'o' appears twice"),
                           ([{**offline_line("o", "x"), "interval": 0}], "needs the 'video' it reads and the 'interval'"),
                           ([{**offline_line("o", "x"), "messages": offline_line("o", "x")["messages"][:2]}],
                            "one user turn .* and one assistant turn"), ([], "no dialogues")):
        with pytest.raises(ValueError, match=message):
            benchmarks.load_offline(offline_file(tmp_path, lines))


def test_offline_scoring_by_hand():
    examples = [{"question_id": q, "answer": "Red, blue."} for q in "abcde"]
    preds = {"a": [(20.0, "red blue")], "b": [(20.0, "Red.")], "c": [(20.0, "Blue, red.")], "d": [], "e": [(20.0, "RED,  Blue!")]}
    summary, verdicts = benchmarks.score_offline(examples, preds)
    assert [verdicts[q]["correct"] for q in "abcde"] == [True, False, False, False, True]  # order matters; case does not
    assert (summary["correct"], summary["accuracy"], summary["silent"]) == (2, 40.0, 1)
    assert benchmarks.normalise("Red, blue.") == "red blue"
