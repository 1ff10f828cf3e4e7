"""PAUC: the ProactiveVideoQA metric and the MMDuet2 GRPO reward (paper Sec. 4.3.2, Eq. 1-2).

Role in the pipeline: `grpo.py` calls `mmduet2_reward` on every rollout (the training signal);
`evaluate.py` scores `infer.py`'s predictions with the metric (what the paper's Table 2 reports).
Both rest on `area_ratio`: a step curve of judge scores over a gold reply span, area under it / best area.
1. The metric (`pauc_metric`): replies judged cumulatively on a 3-point scale (S = 2), late
   replies that lower the score pruned, mean over all gold turns, reported x100 at w = 0/0.5/1.
2. The reward (`mmduet2_reward`): r = 3*r_PAUC + 2*r_rep + 0.5*r_in_span + 2*r_pfx, where
   r_PAUC judges each reply alone on a 5-point scale (S = 4) without pruning.
Also here: what a judge answers (`Judge`; the LLM one is llm.OpenAIJudge) with the deterministic
`OfflineJudge`, and `load_gold`, the project's one loader of a ProactiveVideoQA anno.json. This file
imports only the standard library: its math is read and tested without a model, openai or tqdm.
Definitions and worked examples: docs/reward.md.

Where we depart from the paper or the released code (each also noted beside its line):
1. r_in_span divides by the turns in no gold span (NO REPLY included), as the released code does,
   not by "all reply entries" as the paper's prose says: the code made the numbers.
2. r_rep counts each reply once; the released code counts some judged replies twice.
3. The metric's "reply duplicate proportion" is our reconstruction: the released evaluation file
   could not be read.

Run: python -m pytest tests/test_reward.py -q     # the worked examples of docs/reward.md, offline
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Protocol

SILENCE = "NO REPLY"  # the silence turn; must match mmduet2.SILENCE (this file imports nothing of ours)
METRIC_SCALE = 3  # ProactiveVideoQA judge: 1 incorrect / 2 partial / 3 mostly covered -> S = 2
REWARD_SCALE = 5  # MMDuet2 reward judge: 5 points stored 0..4 -> S = 4 (paper Sec. 4.3.2)
PREFIX_CHARS = 50  # r_pfx: a shared prefix this long marks a "verbose prefix" turn


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
# Judges: one interface, the parsers of an LLM judge's answers, the offline judge

class Judge(Protocol):
    """What the metric and the reward need from a judge (OfflineJudge below, llm.OpenAIJudge).

    score: how well `pred` covers `gold` for `question`, on a `scale`-point rubric (3 or 5),
        returned as the judge's digit - 1 (so 0..scale-1), or None when the call failed.
    repeats: whether all information in `new` is already in `previous`, or None on failure.
    A None is dropped by the callers (and counted in `failures`), never read as a score of 0.
    max_workers: calls that may run at once (grpo.py scores its rollouts with llm.imap).
    map(fn, jobs), optional: fn(*job) for each job, in job order, calls running concurrently
        (OpenAIJudge: llm.imap); the metric judges through it. Without it, one call at a time.
    """
    calls: int
    cache_hits: int
    failures: int
    max_workers: int

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
    max_workers = 1  # cheap: llm.imap runs it inline

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


def _judge_all(judge, fn, jobs):
    """[fn(*job) for job in jobs]: through the judge's `map` when it has one (llm.OpenAIJudge: requests
    run concurrently, results in job order), else one call at a time (OfflineJudge: instant, no threads).
    This file imports nothing of ours, so the threads belong to the judge (llm.imap), not to reward.py."""
    run = getattr(judge, "map", None)
    return list(run(fn, jobs)) if run else [fn(*job) for job in jobs]


# ----------------------------------------------------------------------------------------------
# 1. The ProactiveVideoQA metric (evaluation)

def is_seconds(v):
    """A finite number that is not a bool (json reads NaN and Infinity; True is an int to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_id(v):
    """A usable question_id: a string or an int (hashable; a bool would collide with 0 and 1)."""
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _span(turn, key, where):
    """[start, end] of a gold turn as floats: reply_timespan 0 <= s0 < s1, related_timespan r0 <= r1."""
    span = turn.get(key) if isinstance(turn, dict) else None
    # a NaN bound would make every "s0 <= t <= s1" false: the turn would silently score as silence
    if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(map(is_seconds, span))):
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


def sorted_replies(preds):
    """(time, text) replies in time order: stripped, NO REPLY left out (silence is not a reply)."""
    out = [(float(t), text.strip()) for t, text in preds if text.strip() != SILENCE]
    return sorted(out, key=lambda r: r[0])  # stable: replies at the same time keep their order


def question_of(example, turn):
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
    are absent; score None: the call failed; on_curve False: pruned), for evaluate.py's timeline page.
    """
    # Two passes: first every judge input is written down, then all are judged at once. Cumulative
    # judging needs only the earlier TEXTS, never their scores, so the inputs are known up front
    # and the judge can answer them concurrently (its `map`).
    jobs, turns = [], []  # judge requests; per gold turn (s0, s1, r1, [(time, text, job index)])
    for i, ex in enumerate(examples):
        qid = ex["question_id"]
        if qid not in predictions:
            raise ValueError(f"no prediction for question_id {qid!r} (example {i})")
        replies = sorted_replies(predictions[qid])  # in time order, NO REPLY left out
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
                jobs.append((question_of(ex, g), g["content"], " ".join(kept), METRIC_SCALE))
            turns.append((s0, s1, r1, requests))
    scores = _judge_all(judge, judge.score, jobs)  # the judge's digit - 1 (0..2), or None
    out = []
    for s0, s1, r1, requests in turns:
        points = [(t, scores[k]) for t, _, k in requests if scores[k] is not None]  # failures dropped, not 0
        on_curve = prune_late(points, r1)  # pruning compares times with r1, so it runs before the shift
        judged = {(t, text): (scores[k], (t, scores[k]) in on_curve) for t, text, k in requests}
        out.append(([(t - s0, s) for t, s in on_curve], s1 - s0, judged))  # x = seconds since s0
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
    return pauc(turns, omega)


def pauc(turns, omega=0.5):
    """PAUC from metric_turns' judged turns: the judge scores do not depend on omega, so evaluate.py judges once
    and computes this for each omega. One mean over every gold turn: a video with four gold turns weighs four times
    one with a single turn."""
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
        texts = [text for _, text in sorted_replies(preds)]
        for i, text in enumerate(texts):
            earlier = list(dict.fromkeys(texts[:i]))  # unique, in order: a shorter prompt, same meaning
            if text in earlier or not earlier:
                verdicts.append(bool(earlier))  # exact repeat -> True; first reply -> False
            else:
                slots.append(len(verdicts))
                verdicts.append(None)
                jobs.append((earlier, text))
    for slot, verdict in zip(slots, _judge_all(judge, judge.repeats, jobs)):
        verdicts[slot] = verdict  # None again if the call failed: dropped just below
    counted = [v for v in verdicts if v is not None]  # failed calls dropped from both counts
    return sum(counted) / len(counted) if counted else 0.0


def reply_delays(turns, answers):
    """Seconds from each gold reply span's start to the first reply inside it, for the spans that got one.

    turns: (time, text) assistant turns, NO REPLY ones included or not; answers: gold turns with reply_timespan.
    Example: span [10, 20], replies at 13 and 16 -> [3.0]; span [30, 40] with no reply in it -> nothing.
    """
    replies = sorted_replies(turns)  # sorted by time, so the first match below is the earliest reply
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
        replies = sorted_replies(predictions[ex["question_id"]])
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
# The gold: anno.json, with errors that say where

def load_gold(path):
    """THE loader of a ProactiveVideoQA anno.json for the whole project (evaluate.py, infer.py, grpo.py).

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
        if not is_id(ex["question_id"]):
            raise ValueError(f"{where}: 'question_id' must be a string or an integer, got {ex['question_id']!r}")
        where += f" ({ex['question_id']})"  # later errors name the id too: easier to find than an index
        # predictions are matched to gold by question_id: a duplicate would score one video's
        # replies against the other's answers
        if ex["question_id"] in seen:
            raise ValueError(f"{where}: question_id appears twice")
        seen.add(ex["question_id"])
        if not (isinstance(ex["video"], str) and ex["video"]):
            raise ValueError(f"{where}: 'video' must be a file name, got {ex['video']!r}")
        if not (is_seconds(ex["duration"]) and ex["duration"] > 0):
            raise ValueError(f"{where}: 'duration' must be a number of seconds > 0, got {ex['duration']!r}")
        conv = ex["conversation"]
        if not (isinstance(conv, list) and conv):
            raise ValueError(f"{where}: 'conversation' must be a non-empty list of turns, the question first")
        for j, turn in enumerate(conv):
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("role", "content"))):
                raise ValueError(f"{where} conversation {j}: a turn needs a text 'role' and 'content', got {turn!r:.99}")
            # j == 0 without a time is the question asked at 0; any turn that does carry a time is checked
            if (j or "time" in turn) and not (is_seconds(turn.get("time")) and turn["time"] >= 0):
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
