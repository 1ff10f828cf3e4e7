"""Evaluation: score infer.py's predictions with the ProactiveVideoQA metric (paper Sec. 5.1, Table 2).

Role in the pipeline: the last step. `infer.py --benchmark` streams a benchmark into predictions; this
script judges them with reward.py's metric (PAUC x100 at w = 0 / 0.5 / 1, the reply duplicate proportion),
prints one summary per predictions file, and can draw a timeline page of when each model spoke against
the gold reply spans. What it prints, writes and refuses: docs/reward.md, "evaluate.py".

The paper's other two evaluations score here too, told apart by the --gold file's fields (benchmarks.py,
docs/benchmarks.md): StreamingBench Proactive Output (time and answer accuracy, Table 5) and offline QA
(exact-match accuracy, Table 4 in miniature); no judge and no page for these.

Run:
    python evaluate.py --gold anno.json --pred preds.jsonl --judge offline
    python evaluate.py --gold data/toy/test/questions_proactive.json --pred sb-sft.jsonl sb-grpo.jsonl --label SFT GRPO
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=EMPTY JUDGE_MODEL=Qwen/Qwen2.5-32B-Instruct \
        python evaluate.py --gold anno.json --pred preds.jsonl --judge openai --json scores.json
    python evaluate.py --gold anno.json --pred runs/preds-sft.jsonl runs/preds-grpo.jsonl \
        --label SFT GRPO --html timeline.html    # two runs, one summary each, one page to compare them
    python -m pytest tests/test_evaluate.py -q

Exit status 1 when more than --max-failures of a file's judge calls failed (the scores are printed and
flagged NOT A RESULT); 130 on Ctrl-C, with the judge answers already cached kept for the rerun.
"""
import argparse
import html
import json
import math
import os
import sys
from pathlib import Path

import benchmarks
from llm import DEFAULT_CACHE, OpenAIJudge
from runs import hold_output
from reward import (METRIC_SCALE, SILENCE, JudgeError, OfflineJudge, duplicate_proportion,
                    gold_warnings, is_id, is_seconds, load_gold, metric_turns, pauc, question_of,
                    reply_stats, sorted_replies)


# ----------------------------------------------------------------------------------------------
# Predictions and the summary

def load_predictions(path, known_ids=None):
    """preds.jsonl -> {question_id: [(time, text), ...]}, assistant replies only (NO REPLY dropped)."""
    preds = {}
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:  # e.g. UTF-16, as some Windows editors save: the error would name no file
        raise ValueError(f"{path} is not UTF-8 text (saved as UTF-16?): save it as UTF-8") from None
    for _, where, row in benchmarks.json_lines(path, text):
        if not (isinstance(row, dict) and "question_id" in row and isinstance(row.get("model_response_list"), list)):
            raise ValueError(f"{where}: expected {{\"question_id\": ..., \"model_response_list\": [...]}}")
        qid = row["question_id"]
        if not is_id(qid):
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
            if not (is_seconds(t) and t >= 0 and isinstance(text, str)):
                raise ValueError(f"{where}: an assistant turn needs a numeric 'time' (finite, >= 0 s) "
                                 f"and a text 'content', got {turn!r:.99}")
            if text.strip() != SILENCE:  # should already be left out; silence anyway
                replies.append((float(t), text.strip()))
        preds[qid] = replies
    if not preds:
        raise ValueError(f"{path}: no predictions (the file is empty)")
    return preds


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
        for t, text in sorted_replies(predictions[ex["question_id"]]):
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


def evaluate(gold, pred_path, judge, omegas=(0.0, 0.5, 1.0), max_failures=0.01):
    """Score one predictions file against `gold` (load_gold's examples): (summary, marks).

    summary: everything this script prints, as a dict (judged once, areas computed per omega).
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
    by_omega = {w: 100 * pauc(turns, w) for w in omegas}
    dup = duplicate_proportion({ex["question_id"]: preds[ex["question_id"]] for ex in examples}, judge)
    stats = reply_stats(examples, preds)
    calls, hits, failures = judge.calls - calls0, judge.cache_hits - hits0, judge.failures - failures0
    share = failures / (calls + hits) if calls + hits else 0.0
    summary = {"pauc": {str(w): v for w, v in by_omega.items()}, "duplicate_proportion": dup,
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


def evaluate_other(kind, gold, pred_path):
    """Score one predictions file on StreamingBench Proactive Output or offline QA (benchmarks.py): the summary,
    with the questions that have no prediction listed as skipped (an interrupted infer.py run)."""
    preds = load_predictions(pred_path, known_ids={ex["question_id"] for ex in gold})
    examples = [ex for ex in gold if ex["question_id"] in preds]
    if not examples:
        raise ValueError(f"{pred_path}: no prediction matches a gold example")
    score = benchmarks.score_streamingbench if kind == "streamingbench" else benchmarks.score_offline
    summary, verdicts = score(examples, preds)
    summary["skipped"] = [ex["question_id"] for ex in gold if ex["question_id"] not in preds]
    summary["per_question"] = verdicts
    return summary


def format_other(s):
    """The printed summary of evaluate_other."""
    skipped = f" ({len(s['skipped'])} skipped, no prediction: {', '.join(map(str, s['skipped']))})" if s["skipped"] else ""
    if s["benchmark"] == "offline":
        return (f"offline QA: {s['examples']} questions{skipped}, {s['silent']} unanswered\n"
                f"accuracy (exact match, case and punctuation aside) x100: {s['accuracy']:.2f} ({s['correct']} of {s['examples']})")
    offset = s["mean_first_reply_offset_s"]
    offset = "n/a" if offset is None else f"{offset:+.2f} s"
    return (f"StreamingBench Proactive Output: {s['examples']} questions{skipped}, {s['silent']} with no reply\n"
            f"time accuracy x100 (first reply within +-{benchmarks.SB_TOLERANCE:g} s): {s['time_accuracy']:.2f} "
            f"({s['time_correct']} of {s['examples']})\n"
            f"answer accuracy x100 (on time and the output in it; the paper's Table 5): {s['answer_accuracy']:.2f} "
            f"({s['answer_correct']} of {s['examples']})\n"
            f"extra diagnostic (not the benchmark's metric): first reply {offset} from the ground-truth time on average")


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
# The timeline page (`--html`): WHEN each model spoke, against the gold reply spans
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
        about = f"gold {j + 1}, reply span {s0:g}-{s1:g} s, question: {question_of(example, g)}; answer: {g['content']}"
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
    parser = argparse.ArgumentParser(description="Score streaming predictions with the ProactiveVideoQA PAUC: "
                                     "x100 at w = 0 / 0.5 / 1, the duplicate proportion, counts.")
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    # data
    parser.add_argument("--gold", required=True, type=path, help="benchmark anno.json (a JSON list of examples); or StreamingBench's "
                        "questions_proactive.json, or offline QA dialogues (data.py offline): told apart by their fields")
    parser.add_argument("--pred", required=True, nargs="+", type=path,
                        help="predictions JSONL from infer.py, one example per line; several files (e.g. an SFT "
                             "and a GRPO run) are each scored, with one summary each")
    parser.add_argument("--label", nargs="+", default=None,
                        help="a name per --pred file, in the same order (default: the file names without .jsonl)")
    parser.add_argument("--json", default=None, type=path,
                        help="also write the summary to this JSON file; with several --pred: "
                             '{"gold": GOLD, "runs": {LABEL: summary with its "pred" path}}')
    parser.add_argument("--html", default=None, type=path,
                        help="also write a self-contained timeline page: per video, the gold reply spans and "
                             "every file's replies at their time, with their scores")
    # judge
    parser.add_argument("--judge", choices=["offline", "openai"], default="offline",
                        help="offline: deterministic word overlap; openai: an LLM behind an OpenAI-compatible endpoint")
    parser.add_argument("--model", default=None, help="judge model (default: $JUDGE_MODEL)")
    parser.add_argument("--base-url", default=None, help="endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    parser.add_argument("--api-key", default=None, help="key (default: $OPENAI_API_KEY, prefer it: flags show in ps)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=path, help="JSONL cache of judge answers ('' to disable)")
    parser.add_argument("--workers", type=int, default=8, help="judge requests in flight at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--retries", type=int, default=3, help="retries of a timed-out / 429 / 5xx request")
    parser.add_argument("--max-failures", type=float, default=0.01,
                        help="largest share of judge calls that may fail: a failed judgment is dropped (its reply "
                             "counts as silence), so past this share evaluate.py prints what happened and exits 1; "
                             "default 0.01 lets a rare timeout pass and stops a broken judge")
    args = parser.parse_args(argv)
    if not 0 <= args.max_failures <= 1:
        raise SystemExit(f"evaluate.py: --max-failures is a share of the judge calls, in [0, 1]; got {args.max_failures}")
    labels = args.label or [Path(p).stem for p in args.pred]
    # labels key the --json runs and name the page's lanes: two equal ones would overwrite each other
    if len(labels) != len(args.pred) or len(set(labels)) != len(labels):
        raise SystemExit(f"evaluate.py: {len(args.pred)} --pred files need as many distinct names, got {labels}; "
                         "give them with --label")
    # which benchmark --gold is, by its fields: the two other ones need no judge (a missing file: load_gold says so)
    kind = benchmarks.detect(args.gold) if os.path.isfile(args.gold) else "proactivevideoqa"
    if kind != "proactivevideoqa":
        return main_other(args, kind, labels)
    cached = args.judge == "openai" and args.cache  # only then do judge answers outlive the run

    judge, runs = None, []  # judge stays None if Ctrl-C comes before it is built (see below)
    try:
        # two evals at once would ask every judge question twice and write each answer twice
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
        raise SystemExit(f"evaluate.py: {e}") from None  # one line, no traceback
    except KeyboardInterrupt:  # llm.imap's workers are daemons: nothing waits for the requests in flight
        if cached and judge is not None:
            kept = f"the {judge.cached} judge answers are in {judge.cache_path}: a rerun asks only the rest"
        else:
            kept = "no judge answer is kept (offline judge or --cache ''): a rerun starts over"
        print(f"evaluate.py: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, the shell's convention
    failed = [(label, s) for label, _, s, _ in runs if not s["valid"]]
    if failed:
        what = "; ".join(f"{label + ': ' if len(runs) > 1 else ''}{s['judge_failures']} of "
                         f"{s['judge_calls'] + s['judge_cache_hits']} judge calls failed "
                         f"({100 * s['judge_failure_share']:.1f}%)" for label, s in failed)
        kept = f"the answers already in {args.cache} are kept, " if cached else ""
        raise SystemExit(f"evaluate.py: {what}, more than --max-failures {100 * args.max_failures:g}%: the scores "
                         f"above are not a result; fix the judge (see its last failure) and rerun: "
                         f"{kept}only the failed calls are asked again")
    return result


def main_other(args, kind, labels):
    """StreamingBench Proactive Output or offline QA: every --pred file scored by the benchmark's fixed rule."""
    if args.html:
        raise SystemExit("evaluate.py: --html draws PAUC timelines, for a ProactiveVideoQA anno.json; "
                         f"--gold {args.gold} is {'StreamingBench' if kind == 'streamingbench' else 'offline QA'}")
    runs = []
    try:
        if args.json:
            hold_output(args.json)
        gold = benchmarks.load_streamingbench(args.gold) if kind == "streamingbench" else benchmarks.load_offline(args.gold)
        for label, pred in zip(labels, args.pred):
            summary = evaluate_other(kind, gold, pred)
            if len(args.pred) > 1:
                print(f"== {label}: {pred}")
            print(format_other(summary))
            runs.append((label, pred, summary))
        result = runs[0][2] if len(runs) == 1 else {
            "gold": args.gold, "runs": {label: dict(s, pred=pred) for label, pred, s in runs}}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    except (ValueError, OSError) as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    return result


if __name__ == "__main__":
    main()
