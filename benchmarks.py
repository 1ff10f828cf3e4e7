"""The paper's other two evaluations: StreamingBench Proactive Output (Table 5) and offline video QA (Table 4).

Role in the pipeline: beside reward.py (ProactiveVideoQA, Table 2), the loaders and the scorers of the two
other benchmark files that `infer.py --benchmark` streams and `evaluate.py --gold` scores. Each file is told
apart by its fields (`detect`), so the commands stay the same for all three:
  - StreamingBench's `questions_proactive.json` (Lin et al., 2024; paper Sec. 5.1, Table 5): a question such as
    'When the scoreboard shows 3 points for USA, output "3".', asked at `time_stamp`; the answer is right when
    the first reply comes within +-2 s of `ground_truth_time_stamp` and contains `ground_truth_output`.
  - Offline QA (`data.py offline`'s format; Sec. 5.2, Table 4 in miniature): the whole video in one user turn,
    Qwen's default system prompt, one answer, scored by exact match after normalising case and punctuation.
Standard library only, like reward.py: the scoring can be read and tested without a model.
Layouts, the official protocol and where we depart from it: docs/benchmarks.md.

    python infer.py --benchmark data/toy/test/questions_proactive.json --model runs/grpo-toy/final \\
        --interval 2 --frames-per-turn 2 --max-new-tokens 16 --out runs/sb-grpo-toy.jsonl
    python evaluate.py --gold data/toy/test/questions_proactive.json --pred runs/sb-grpo-toy.jsonl
    python -m pytest tests/test_benchmarks.py -q
"""
import json
import os
import re

SB_TASK = "Proactive Output"  # StreamingBench's task_type of these questions
SB_TOLERANCE = 2.0  # s: the official scorer counts a reply whose time is within +-2 s of the ground truth
SB_TAIL = 4.0  # s: the official polling stops 4 s after the ground-truth time
IMAGE = "<image>"  # a frame in a dialogue's text (mmduet2.IMAGE; not imported: this file stands alone)


def detect(path):
    """Which benchmark a --benchmark / --gold file is, by its fields: "streamingbench" (a JSON list of
    {video_path, questions}), "offline" (JSON lines of dialogues with "messages", as `data.py offline` writes
    them), else "proactivevideoqa" (an anno.json list of {video, conversation, answer}), whose loader
    (reward.load_gold) says what is wrong with a file that is none of the three."""
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        return "proactivevideoqa"  # not text at all: load_gold's one line says so
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # not one JSON document: JSON lines?
        try:
            data = json.loads(next((line for line in text.splitlines() if line.strip()), ""))
        except json.JSONDecodeError:
            data = None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "questions" in data[0]:
        return "streamingbench"
    if isinstance(data, dict) and "messages" in data:  # the first line of an offline file (or its only one)
        return "offline"
    return "proactivevideoqa"


# ----------------------------------------------------------------------------------------------
# StreamingBench Proactive Output (Table 5)

def seconds(stamp):
    """StreamingBench's "HH:MM:SS" (or "MM:SS", "SS") as seconds, as the official code reads it.
        "00:00:29" -> 29      "01:02:03" -> 3723      "1:05" -> 65
    """
    parts = stamp.split(":") if isinstance(stamp, str) else []
    if not parts or len(parts) > 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected a time as HH:MM:SS, got {stamp!r}")
    return sum(int(p) * 60 ** i for i, p in enumerate(reversed(parts)))


def hms(t):
    """Whole seconds as "HH:MM:SS", the layout's time format: 29 -> "00:00:29"."""
    t = int(t)
    return f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}"


def load_streamingbench(path):
    """questions_proactive.json -> one dict per question, in file order, every field checked (one-line errors):
    {question_id, video (the entry's video_path), question, start, gt_time (s), gt_output, task_type}.

    The layout has no question ids: a question is named by its video's file name and its place among that
    video's questions, "sample_17_proactive_q0" (stable as long as the file is). Only Proactive Output
    questions are scored this way; the other StreamingBench tasks are multiple choice (not supported).
    """
    try:
        data = json.load(open(path, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from None
    if not (isinstance(data, list) and data):
        raise ValueError(f"{path}: expected a JSON list of videos, each {{video_path, questions}}")
    out, seen = [], {}
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        if not (isinstance(entry, dict) and isinstance(entry.get("video_path"), str)
                and isinstance(entry.get("questions"), list)):
            raise ValueError(f"{where}: expected {{\"video_path\": \"...\", \"questions\": [...]}}")
        stem = os.path.splitext(os.path.basename(entry["video_path"]))[0]
        for k, q in enumerate(entry["questions"]):
            here = f"{where} question {k}"
            if not isinstance(q, dict):
                raise ValueError(f"{here}: expected an object")
            if q.get("task_type", SB_TASK) != SB_TASK:
                raise ValueError(f"{here}: task_type {q.get('task_type')!r}: only {SB_TASK!r} questions are "
                                 "scored here (the other StreamingBench tasks are multiple choice)")
            missing = [f for f in ("question", "time_stamp", "ground_truth_time_stamp", "ground_truth_output")
                       if not isinstance(q.get(f), str) or not q[f].strip()]
            if missing:
                raise ValueError(f"{here}: needs {', '.join(missing)} (text)")
            try:
                start, gt = seconds(q["time_stamp"]), seconds(q["ground_truth_time_stamp"])
            except ValueError as e:
                raise ValueError(f"{here}: {e}") from None
            if gt <= start:  # the official poll starts at time_stamp + 1: an earlier truth can never be met
                raise ValueError(f"{here}: ground_truth_time_stamp {q['ground_truth_time_stamp']} is not after "
                                 f"time_stamp {q['time_stamp']}")
            n = seen[stem] = seen.get(stem, -1) + 1  # the video's questions so far, over every entry naming it
            out.append({"question_id": f"{stem}_q{n}", "video": entry["video_path"], "question": q["question"],
                        "start": float(start), "gt_time": float(gt), "gt_output": q["ground_truth_output"],
                        "task_type": SB_TASK})
    return out


def sb_frames(question, interval):
    """Frames to stream for one question: from its start to the official poll's last time, gt + 4 s, so that
    the last turn (frames so far x interval after the start) is at or before gt + 4.
        start 20, gt 29, 1 s -> 13 frames: turns at 21, 22, ..., 33      2 s -> 6 frames (last turn at 32)
    """
    return int((question["gt_time"] + SB_TAIL - question["start"]) / interval + 1e-6)


def sb_warnings(question, duration):
    """Why a question cannot be scored fairly on its video (`duration` s), as reward.gold_warnings says it for
    ProactiveVideoQA: kept and scored as defined (silence), but said. [] when there is nothing to say."""
    if duration < question["gt_time"]:
        return [f"the video ends at {duration:g} s, before the ground-truth time {question['gt_time']:g} s"]
    return []


def score_streamingbench(questions, predictions):
    """Time and answer accuracy of one run, the official way: (summary, {question_id: verdict}).

    predictions: {question_id: [(time, text)]}, the non-silent replies (evaluate.load_predictions). Only
    the FIRST reply counts (the official polling stops at the first "yes"): its time t must be within
    |t - gt| <= 2 s, and, for the answer, the ground-truth output must appear in its text (a plain,
    case-sensitive substring, as the official scorer). Silence is neither. Both accuracies are over
    every question scored, x100 (the paper's Table 5 reports answer accuracy).
        gt 29 s, output "3": "3" at 31 s -> time and answer; "3" at 32 s -> neither; "two" at 29 s -> time only
    """
    verdicts = {}
    for q in questions:
        replies = sorted(predictions[q["question_id"]], key=lambda r: r[0])  # stable: same-time replies keep order
        t, text = replies[0] if replies else (None, None)
        on_time = t is not None and abs(t - q["gt_time"]) <= SB_TOLERANCE + 1e-9  # the epsilon: float times
        verdicts[q["question_id"]] = {"reply_time": t, "reply": text, "gt_time": q["gt_time"],
                                      "time_correct": on_time, "answer_correct": on_time and q["gt_output"] in text}
    n = len(verdicts)
    time_ok = sum(v["time_correct"] for v in verdicts.values())
    answer_ok = sum(v["answer_correct"] for v in verdicts.values())
    silent = sum(v["reply_time"] is None for v in verdicts.values())
    delays = [v["reply_time"] - v["gt_time"] for v in verdicts.values() if v["reply_time"] is not None]
    summary = {"benchmark": "streamingbench", "examples": n, "time_correct": time_ok, "answer_correct": answer_ok,
               "time_accuracy": 100 * time_ok / n, "answer_accuracy": 100 * answer_ok / n, "silent": silent,
               "mean_first_reply_offset_s": sum(delays) / len(delays) if delays else None}
    return summary, verdicts


# ----------------------------------------------------------------------------------------------
# Offline QA (Table 4 in miniature)

def json_lines(path, text):
    """(line number, "PATH line N", record) for each non-blank line of a JSON-lines text; a line that is not JSON
    is a one-line ValueError naming it (evaluate.py's predictions use it too)."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield n, f"{path} line {n}", record


def load_offline(path):
    """An offline QA file (`data.py offline`: one dialogue per line) -> one dict per line, in file order:
    {question_id, record (the line, for mmduet2.load_dialogue), system, question, answer, frames, time}.

    A line must be exactly [system?, user (frames + question), assistant (the answer)]; a missing system
    message means Qwen's default one, as Qwen2.5-VL's template adds it.
    """
    out, ids = [], set()
    for n, where, rec in json_lines(path, open(path, encoding="utf-8").read()):
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in messages)):
            raise ValueError(f"{where}: expected a dialogue {{id, video, interval, messages: [...]}}")
        system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
        turns = messages[1:] if system is not None else messages
        interval = rec.get("interval")
        if not (isinstance(rec.get("video"), str) and isinstance(interval, (int, float)) and 0 < interval < 1e9):
            raise ValueError(f"{where}: needs the 'video' it reads and the 'interval' (s) of its frames, "
                             "as data.py offline writes them")
        if [m.get("role") for m in turns] != ["user", "assistant"]:
            raise ValueError(f"{where}: an offline QA dialogue is one user turn (frames + question) and one "
                             "assistant turn (the answer)")
        qid = rec.get("id", f"{os.path.splitext(os.path.basename(path))[0]}-{n}")
        if qid in ids:
            raise ValueError(f"{where}: id {qid!r} appears twice")
        ids.add(qid)
        user, answer = turns
        out.append({"question_id": qid, "record": rec, "system": system, "question": user["content"].replace(IMAGE, ""),
                    "answer": answer["content"], "frames": user["content"].count(IMAGE),
                    "time": float(user.get("time", 0.0))})
    if not out:
        raise ValueError(f"{path}: no dialogues (the file is empty)")
    return out


def normalise(text):
    """An answer as the words it says: lower case, punctuation dropped. "Red, blue." -> "red blue"."""
    return " ".join(re.findall(r"\w+", text.lower()))


def score_offline(examples, predictions):
    """Exact-match accuracy x100 of one run: (summary, {question_id: verdict}). The first reply is the answer
    (there is one turn); no reply (or NO REPLY) is wrong. Equal after `normalise`:
        gold "Red, blue." : "red blue" -> right;  "Red." -> wrong;  "Blue, red." -> wrong (order matters)
    """
    verdicts = {}
    for ex in examples:
        replies = sorted(predictions[ex["question_id"]], key=lambda r: r[0])
        text = replies[0][1] if replies else None
        verdicts[ex["question_id"]] = {"reply": text, "answer": ex["answer"],
                                       "correct": text is not None and normalise(text) == normalise(ex["answer"])}
    n, right = len(verdicts), sum(v["correct"] for v in verdicts.values())
    return {"benchmark": "offline", "examples": n, "correct": right, "accuracy": 100 * right / n,
            "silent": sum(v["reply"] is None for v in verdicts.values())}, verdicts
