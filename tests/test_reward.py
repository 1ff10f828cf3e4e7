"""Tests for reward.py: every worked example of docs/reward.md, checked by hand, plus the rules
around it (monotonicity, inclusive spans, pruning, truncated rollouts), the offline judge and the
parsers of an LLM judge's answers, the gold loader, and that reward.py imports without openai, tqdm,
torch or transformers. No network, a few seconds in all. The LLM judge: tests/test_llm.py; the
evaluation script: tests/test_evaluate.py.

Run: python -m pytest tests/test_reward.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reward.py lives in the repo root
import reward  # noqa: E402
from conftest import example  # noqa: E402
from reward import (SILENCE, OfflineJudge, area_ratio,  # noqa: E402
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


STANDALONE = """
import sys
from pathlib import Path
for name in ("openai", "tqdm", "torch", "transformers"):
    sys.modules[name] = None  # `import openai` (or openai.x) now raises ImportError
import reward

class Judge:  # the worked example's judge: "poured" scores 4, "stirs" 3, a repeat never
    calls = cache_hits = failures = 0
    def score(self, question, gold, pred, scale):
        return {FISH: 4, SUGAR: 3, "A reply.": 2}[pred]
    def repeats(self, previous, new):
        return False

r = reward.mmduet2_reward(ROLLOUT, GOLD, Judge())
ex = {"video": "v1.mp4", "question_id": "v1", "duration": 60.0,
      "conversation": [{"role": "user", "content": "What happens?", "time": 0}],
      "answer": [{"content": "gold", "related_timespan": [10, 19], "reply_timespan": [10, 20]},
                 {"content": "gold", "related_timespan": [30, 39], "reply_timespan": [30, 40]}]}
metric = reward.pauc_metric([ex], {"v1": [(14, "A reply.")]}, Judge())
ours = {p.stem for p in Path(reward.__file__).parent.glob("*.py")} - {"reward"}
print(round(r["total"], 6), round(metric, 6), sorted(ours & set(sys.modules)))
"""


def test_reward_imports_only_the_standard_library():
    """reward.py loads and computes the worked examples (docs/reward.md: the reward, the metric's docstring)
    in a process where openai, tqdm, torch and transformers cannot be imported, and imports no file of ours."""
    code = f"FISH, SUGAR, SILENCE = {FISH!r}, {SUGAR!r}, {SILENCE!r}\nGOLD = {GOLD!r}\nROLLOUT = {ROLLOUT!r}\n"
    run = subprocess.run([sys.executable, "-c", code + STANDALONE], cwd=Path(reward.__file__).parent,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1.421875", "0.55", "[]"]


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
