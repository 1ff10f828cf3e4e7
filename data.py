"""Data: scene captions → proactive dialogues (SFT) + gold reply spans (ProactiveVideoQA anno.json).

Pipeline:  **data.py** ──▶ sft.py ──▶ grpo.py ──▶ infer.py ──▶ evaluate.py      (paper Sec. 3, Sec. 4.2)

From one JSONL line per video, `{"video", "duration", "scenes": [{"start", "end", "caption"}]}` (Sec. 3 step
(1), scene segmentation and captioning, is done before this file):
  2. QA generation: an LLM reads all captions and writes 2-4 questions, each with one answer per scene or
     exactly "NO REPLY" (`LLMWriter`, `parse_questions`: strict JSON, re-asked when malformed).
  3. Dialogues, half 1QnA (one question at t = 0), half nQnA (all questions, at random turns; the answers of
     scenes already ended are summarised into one "immediate answer"): `make_dialogue`.
  4. SFT placement (Sec. 4.2): an answer sits at the END of its reply span, every other turn is "NO REPLY".
  5. Gold spans: related = the scene, reply = the scene + 1 s; an immediate answer is due at once.
Also the offline mix (`offline_dialogue`, Sec. 4.2), and the toy world's command (toy.py).

Run:
    python data.py toy --out data/toy                        # toy world: train / rl / test, ~3 min on a 2-core CPU
    python data.py build --scenes scenes.jsonl --out data/web --llm toy   # pipeline smoke run, no LLM
    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=EMPTY JUDGE_MODEL=Qwen/Qwen2.5-32B-Instruct \\
        python data.py build --scenes scenes.jsonl --out data/web --workers 16          # full scale, resumable
    python data.py offline --qa llava_video_qa.jsonl --out data/offline.jsonl        # offline mix
The files written: docs/formats.md. Where we depart from the paper: docs/departures.md, each beside its line.
"""
import argparse
import json
import math
import os
import random
import re
import sys
from pathlib import Path

from tqdm import tqdm

import benchmarks
import mmduet2
import reward
import runs
import toy
from llm import LLMClient, imap  # by name: build's `llm` argument is the writer's kind
from mmduet2 import IMAGE, SILENCE

# ----------------------------------------------------------------------------------------------
# Settings (paper values)

INTERVAL = 2.0           # seconds between frames in SFT and RL (Sec. 4.2; 1 s collapses SFT to silence)
FRAMES_PER_TURN = 2      # frames per user turn (Sec. 4.2)
REPLY_TAIL = 1.0         # reply span = scene + this tail (ProactiveVideoQA: s1 ≈ r1 + 1 s)
NQNA_FRAC = 0.5          # share of nQnA dialogues (Sec. 3: "each type covers half")
# Sec. 3: "2 to 4 question-answer lists ... according to its video length" (the cut-offs are ours)
QUESTIONS_BY_LENGTH = ((60.0, 2), (180.0, 3), (math.inf, 4))
RETRIES = 2              # re-asks of an LLM answer that fails to parse, before the video is skipped
OFFLINE_FRAMES = 16      # frames of an offline example (one user turn)
OFFLINE_MIN_INTERVAL = 0.5  # a short offline clip gets fewer frames rather than near-duplicates
CAPTION_QUESTION = "Describe this video in detail."  # offline caption lines (Tarsier2) that carry no question

QA_INSTRUCTION = (
    "You write questions for a video assistant that watches a video live and speaks up whenever "
    "the video answers the user's question. You get the video's scenes in order, each with a "
    "caption. Write questions that a viewer could ask at the start of the video and that several "
    "scenes answer (for example 'Tell me whenever ...' or 'What is the woman doing?'). For every "
    "question give one answer per scene, in scene order: one short sentence that uses only that "
    "scene's caption, or exactly \"NO REPLY\" when that caption does not answer the question. "
    "Never mention scenes or captions in an answer. Reply with JSON only, in this form: "
    '{"questions": [{"question": "...", "answers": ["...", "..."]}]}')
SUMMARY_INSTRUCTION = (
    "A viewer asks a question partway through a video. You get the answers to it from the parts "
    "of the video already shown, in order. Merge them into one short reply that answers the "
    "question for everything shown so far, without repeating yourself. Reply with the answer only.")


# ----------------------------------------------------------------------------------------------
# The two LLM steps (Sec. 3 steps (2) and (3)) behind one small boundary:
#   questions(captions, n) -> [{"question": str, "answers": [str per scene]}]
#   summarise(question, answers) -> str
# LLMWriter asks a real LLM; toy.Writer and the tests plug in deterministic ones.

def n_questions(duration):
    """How many questions to ask about a video of `duration` seconds: 2, 3 or 4."""
    return next(n for limit, n in QUESTIONS_BY_LENGTH if duration < limit)  # the last limit is inf: always found


def _silence(answer):
    """An answer, stripped; the LLM's variants of the silence string ("No reply.") become NO REPLY."""
    answer = answer.strip()
    # one exact string downstream: the template, the metric and the reward all test `== "NO REPLY"`
    return SILENCE if answer.rstrip(".").upper() == SILENCE else answer


def parse_questions(text, n, n_scenes):
    """The QA generator's answer → [{"question", "answers"}], or a one-line ValueError saying what is wrong.

    Strict: JSON (a surrounding ```json fence is allowed), exactly `n` questions, each
    with exactly `n_scenes` non-empty answers. A wrong count would silently shift answers onto
    the wrong scenes, so it is an error, never padded or cut.
    """
    body = text.strip()
    # chat models often wrap JSON in a markdown fence even when told not to: that much we forgive
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    items = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError('expected an object {"questions": [...]}')
    if len(items) != n:  # Sec. 3 ties the count to the video's length: n_questions(duration)
        raise ValueError(f"expected {n} questions, got {len(items)}")
    # each message says which question is wrong and how: it goes back to the LLM in the re-ask
    out = []
    for i, item in enumerate(items, 1):
        question = item.get("question") if isinstance(item, dict) else None
        answers = item.get("answers") if isinstance(item, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question {i} has no 'question' text")
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"question {i}: 'answers' must be a list of non-empty strings")
        if len(answers) != n_scenes:  # answer k belongs to scene k: only the count keeps them aligned
            raise ValueError(f"question {i} has {len(answers)} answers for {n_scenes} scenes")
        out.append({"question": question.strip(), "answers": [_silence(a) for a in answers]})
    return out


class LLMWriter:
    """The two LLM steps through an OpenAI-compatible client (`llm.LLMClient`: cache, retries).

    The client caches answers by prompt (a bad one too), so a re-ask must change the prompt: it
    appends what was wrong, which also helps the model fix it.
    """

    def __init__(self, client, retries=RETRIES):
        self.client, self.retries = client, retries

    def _ask(self, instruction, text, parse):
        """parse(the LLM's answer to `text`), re-asking with the parser's complaint while it raises."""
        error = None
        for _ in range(self.retries + 1):
            # a new prompt on every retry (see the class docstring): the cache would return the same text
            prompt = text if error is None else f"{text}\n\nYour previous reply was rejected ({error}). Try again."
            answer = self.client.ask(instruction, prompt)
            if answer is None:  # the endpoint failed after the client's own retries: not cached, a re-run asks again
                raise ValueError("no answer from the LLM endpoint")
            try:
                return parse(answer)
            except ValueError as e:
                error = str(e)
        raise ValueError(f"LLM answer still malformed after {self.retries + 1} tries: {error}")

    def questions(self, captions, n):
        # Sec. 3 step (2): ALL the captions in one prompt, numbered, so a question can span scenes
        # and the answers come back in scene order
        scenes = "\n".join(f"Scene {i}: {c}" for i, c in enumerate(captions, 1))
        # the counts are repeated at the end, where the model reads them last
        text = f"{scenes}\n\nWrite exactly {n} questions, each with exactly {len(captions)} answers (one per scene)."
        return self._ask(QA_INSTRUCTION, text, lambda a: parse_questions(a, n, len(captions)))

    def summarise(self, question, answers):
        def parse(answer):
            # it is only asked when some ended scene answers the question, so silence here is an LLM error
            if _silence(answer) in ("", SILENCE):
                raise ValueError("empty or silent summary")
            return answer.strip()
        earlier = "\n".join(f"- {a}" for a in answers)
        return self._ask(SUMMARY_INSTRUCTION, f"Question: {question}\nAnswers so far:\n{earlier}", parse)


# ----------------------------------------------------------------------------------------------
# Input: the scene list

def parse_scene_line(line, root):
    """One input line → a checked record (scenes sorted by start); ValueError says what is wrong.

    `video` is resolved relative to `root` (the scenes file's folder) and must exist.
    """
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object {video, duration, scenes}")
    video, duration, scenes = rec.get("video"), rec.get("duration"), rec.get("scenes")
    if not isinstance(video, str) or not video:
        raise ValueError("'video' must be a file path")
    # the duration fixes the turn grid (dialogue_times): it must be usable before any LLM call
    if not isinstance(duration, (int, float)) or duration <= 0:
        raise ValueError(f"'duration' must be a positive number of seconds, got {duration!r}")
    if not isinstance(scenes, list) or not scenes:
        raise ValueError("'scenes' must be a non-empty list of {start, end, caption}")
    for i, s in enumerate(scenes, 1):
        if not (isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in ("start", "end"))
                and isinstance(s.get("caption"), str) and s["caption"].strip()):
            raise ValueError(f"scene {i} must be {{start, end, caption}} with numbers and a non-empty caption")
        if s["end"] <= s["start"]:  # a scene becomes a gold span, and a gold span needs a length
            raise ValueError(f"scene {i} ends at {s['end']} s, not after its start {s['start']} s")
        # 1e-6: a last scene that ends "at" the duration may differ from it in the last float digit
        if s["start"] < 0 or s["end"] > duration + 1e-6:
            raise ValueError(f"scene {i} [{s['start']}, {s['end']}] lies outside the video [0, {duration}]")
    path = os.path.normpath(os.path.join(root, video))  # relative to the scenes file, not the working dir
    if not os.path.isfile(path):  # checked now: found out at training time, the dialogue would be wasted
        raise ValueError(f"video not found: {path}")
    # answers are matched to scenes by position, and dialogue construction walks them in time order
    return {"id": str(rec.get("id") or Path(video).stem), "path": path, "duration": float(duration),
            "scenes": sorted(scenes, key=lambda s: s["start"])}


# ----------------------------------------------------------------------------------------------
# Dialogue construction (Sec. 3 step (3), SFT placement Sec. 4.2)

def dialogue_times(duration, interval, frames_per_turn):
    """(number of frames, user-turn times) of a video, counted exactly as mmduet2.read_frames samples it."""
    # the same helpers as training and inference: a dialogue's turn times are the times the model
    # will see its frames at, so no answer can land on a turn the video never produces
    n_frames = mmduet2.count_frames(duration, interval)
    if n_frames == 0:
        raise ValueError(f"video ({duration} s) is shorter than one frame interval ({interval} s)")
    return n_frames, mmduet2.turn_times(n_frames, interval, frames_per_turn)


def place(times, s0, s1, random_frac, rng):
    """The turn time at which an answer with reply span [s0, s1] is spoken in the SFT dialogue.

    Paper (Sec. 4.2): the END of the span = the last turn time inside it; if no turn falls inside,
    the first turn after s0. With probability `random_frac` a uniformly random turn inside the
    span instead (docs/toy.md: with end placement RL never samples an early reply). None: no turn
    at or after s0.
        times [4, 8, 12, 16], span [5, 14] → 12 (end);  span [5, 7] → 8;  span [17, 18] → None
    """
    inside = [t for t in times if s0 <= t <= s1]
    # `random_frac > 0` comes first so that end placement draws nothing: the generator then gives
    # the same numbers to everything after, as if this option did not exist
    if inside and random_frac > 0 and rng.random() < random_frac:  # no draw at 0: the paper's data uses none
        return rng.choice(inside)
    j = mmduet2.reply_turn(times, (s0, s1))  # the end-of-span rule, shared with grpo.py's context
    return None if j is None else times[j]


def choose_asks(qas, times, nqna, rng):
    """When each question is asked: [(time, qa)], first at 0.0.

    1QnA: one question, drawn among those at least one scene answers. nQnA: all questions in a
    random order, the later ones at distinct random turn times, never the first turn (it carries
    the first question) nor the last (an immediate answer needs a turn to be replied in).
    """
    # a 1QnA dialogue whose question nothing answers would teach only silence (ours: one question per video,
    # drawn among those some scene answers)
    answerable = [qa for qa in qas if any(a != SILENCE for a in qa["answers"])]
    if not answerable:
        raise ValueError("no question is answered by any scene")
    slots = times[1:-1]  # the turns a later question may be asked at
    if not nqna or len(qas) < 2 or not slots:  # 1QnA, or an nQnA that cannot be (one question, no free turn)
        return [(0.0, rng.choice(answerable))]
    # nQnA draws from all the questions, answerable or not (one that no scene answers gets only NO REPLY)
    order = rng.sample(qas, len(qas))[:len(slots) + 1]  # a random order; at most one question per turn
    later = sorted(rng.sample(slots, len(order) - 1))  # distinct turns, so two questions never share one
    return [(0.0, order[0])] + list(zip(later, order[1:]))  # ours: the first question at t = 0


def make_dialogue(duration, scenes, asks, writer, rng, interval=INTERVAL, frames_per_turn=FRAMES_PER_TURN,
                  random_frac=0.0, history_frac=0.0):
    """Questions asked at `asks` = [(time, {"question", "answers"})] → (messages, conversation, gold answers).

    messages: one user turn per turn time (its frames as "<image>", then a question asked at it)
    and one assistant turn after each (the answers placed there, space-joined, or NO REPLY).
    conversation / gold answers: the ProactiveVideoQA `conversation` and `answer` lists.
    """
    n_frames, times = dialogue_times(duration, interval, frames_per_turn)
    turn = interval * frames_per_turn  # seconds of video one user turn holds (4 s at the paper's settings)
    replies = {t: [] for t in times}  # turn time -> answers spoken there
    untrained = set()                 # turn times whose answers are history only (no loss: --history-frac)
    asked = {}                        # turn time -> question text of its user turn
    gold = []                         # the ProactiveVideoQA `answer` list, one entry per answer due

    def add(content, related, reply, question, t):
        """One answer: spoken at turn time t in the dialogue, and one gold entry with its spans."""
        replies[t].append(content)
        # sft_time: the turn the dialogue speaks it at, so that GRPO's context puts it there too (an immediate
        # answer sits at its question's turn, not at the end of its reply span)
        # spans rounded to the millisecond: float noise (3.3000000000000003) stays out of anno.json
        gold.append({"role": "assistant", "content": content, "related_timespan": [round(x, 3) for x in related],
                     "reply_timespan": [round(x, 3) for x in reply], "question": question, "sft_time": t})

    for j, (t_ask, qa) in enumerate(asks):
        question, answers = qa["question"], qa["answers"]
        t_next = asks[j + 1][0] if j + 1 < len(asks) else math.inf  # this question is answered until then
        t_turn = next(t for t in times if t >= t_ask)  # the user turn that carries the question
        asked[t_turn] = question
        # nQnA immediate answer: what the scenes that already ended say about the new question.
        # (For the first question, t_ask = 0: no scene has ended, so 1QnA never gets one.)
        ended = [a for s, a in zip(scenes, answers) if s["end"] <= t_ask and a != SILENCE]
        if ended:  # none: nothing to say yet, the question turn is NO REPLY (ours: the paper does not say)
            summary = writer.summarise(question, ended)
            # related [0, t_ask]: its evidence is everything shown so far; reply [t_ask, one turn
            # later]: it answers the question just asked, so it is due at once (kept inside the video)
            add(summary, (0.0, t_ask), (t_ask, min(t_ask + turn, duration)), question, t_turn)
        # The other scenes are answered in their reply spans "until the next question is raised":
        # an answer is due only if its paper-rule turn comes before the next question (our reading).
        # Decided on the end placement, so the gold answers do not depend on --placement.
        for s, a in zip(scenes, answers):
            if a == SILENCE or s["end"] <= t_ask:  # silent, or already in the immediate answer
                continue
            # reply span = the scene + REPLY_TAIL, cut at the video's end; a scene under way when the
            # question comes starts its span at the question (ours: a reply before it answers nothing)
            s0, s1 = max(s["start"], t_ask), min(s["end"] + REPLY_TAIL, duration)
            t_end = place(times, s0, s1, 0.0, rng)  # the paper's end placement (draws nothing from rng)
            if t_end is None or t_end >= t_next:
                continue  # after the next question (or after the last turn): no longer asked for
            # Sec. 4.2: the answer is spoken at the end of its span (or, with --placement, maybe earlier)
            t_say = place(times, s0, s1, random_frac, rng)
            # a turn whose last frame (at t - interval) shows the square: an early reply there is one a
            # model can learn; at a turn that saw the square only in its first frame, it cannot tell
            earlier = [t for t in times if s0 <= t < t_say and s["start"] <= t - interval < s["end"]]
            if earlier and history_frac > 0 and rng.random() < history_frac:
                # --history-frac: the dialogue already holds this answer, said early in its span, as history
                # the model is not trained to say; what it learns is the NO REPLY of the turns after it,
                # the end-of-span turn included (the square may still be on screen: it was answered)
                t_say = rng.choice(earlier)
                untrained.add(t_say)
            add(a, (s["start"], s["end"]), (s0, s1), question, t_say)

    messages = []
    for j, t in enumerate(times):
        # turn j holds frames [j·fpt, (j+1)·fpt); the last one may hold fewer (an odd frame count)
        n_images = min((j + 1) * frames_per_turn, n_frames) - j * frames_per_turn
        # Sec. 4.1: a user turn is its frames first, then any text (the question asked at it)
        messages.append({"role": "user", "content": IMAGE * n_images + asked.get(t, ""), "time": t})
        # every user turn gets an assistant turn; two answers due at one turn are spoken together
        # a history answer alone is untrained; sharing its turn with an answer due there, the turn is trained
        # whole (a mask per answer within one text is more than this rare case is worth)
        messages.append({"role": "assistant", "content": " ".join(replies[t]) or SILENCE, "time": t}
                        | ({"train": False} if t in untrained and len(replies[t]) == 1 else {}))
    conversation = [{"role": "user", "content": qa["question"], "time": float(t)} for t, qa in asks]
    # time order, as a reader of anno.json expects: by reply span, then by event
    gold.sort(key=lambda g: (g["reply_timespan"][0], g["related_timespan"][0]))
    return messages, conversation, gold


def build_example(rec, writer, rng, out_dir, interval=INTERVAL, frames_per_turn=FRAMES_PER_TURN,
                  random_frac=0.0, nqna_frac=NQNA_FRAC, history_frac=0.0):
    """One checked input record → (SFT dialogue, ProactiveVideoQA example). ValueError: skip the video."""
    captions = [s["caption"] for s in rec["scenes"]]
    qas = writer.questions(captions, n_questions(rec["duration"]))  # Sec. 3 step (2)
    _, times = dialogue_times(rec["duration"], interval, frames_per_turn)
    nqna = rng.random() < nqna_frac  # ours: a draw per video, so "half" holds on average
    asks = choose_asks(qas, times, nqna, rng)
    messages, conversation, answers = make_dialogue(rec["duration"], rec["scenes"], asks, writer, rng,
                                                    interval, frames_per_turn, random_frac, history_frac)
    # ours: the dialogue names the video and the frame interval, and sft.py samples the frames (the released
    # data lists pre-extracted frame files);
    # the path is relative to sft.jsonl's folder, where mmduet2.load_dialogue resolves it
    dialogue = {"id": rec["id"], "video": os.path.relpath(rec["path"], out_dir), "interval": interval,
                "frames_per_turn": frames_per_turn, "messages": messages}
    # anno.json names videos relative to the split's videos/ folder (ProactiveVideoQA); a video kept
    # elsewhere gets its absolute path, which os.path.join(videos_dir, name) passes through unchanged
    videos_dir = os.path.abspath(os.path.join(out_dir, "videos"))
    inside = os.path.abspath(rec["path"]).startswith(videos_dir + os.sep)
    video = os.path.relpath(rec["path"], videos_dir) if inside else os.path.abspath(rec["path"])
    example = {"video": video, "question_id": rec["id"], "duration": rec["duration"],
               "conversation": conversation, "answer": answers}
    return dialogue, example


# ----------------------------------------------------------------------------------------------
# The resumable build

def _journal(path):
    """Records of a JSONL file we append to. A last line cut short by an interruption is removed
    first, so the next append starts on a clean line and the cut video is simply built again."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):  # every complete record ends with "\n": this one was cut
        text = text[:text.rfind("\n") + 1]  # keep up to the last newline (rfind -1: nothing kept)
        path.write_text(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _report(message):
    tqdm.write(f"data.py: {message}", file=sys.stderr)  # above the progress bar, not through it


def build(scenes_path, out_dir, writer, interval=INTERVAL, frames_per_turn=FRAMES_PER_TURN, random_frac=0.0,
          nqna_frac=NQNA_FRAC, seed=0, workers=1, llm="openai", history_frac=0.0):
    """Scene list → out_dir/{sft.jsonl, anno.jsonl, anno.json, build.json}; returns counts.

    Resumable: a video whose id is already in sft.jsonl is skipped; each finished video is
    appended (gold first, dialogue last: the dialogue line marks it done). Every video draws
    from its own generator, seeded by (seed, id), so the output does not depend on the order,
    on --workers, or on how many interruptions it took. A bad input line, a missing video, or an
    LLM answer that stays malformed is reported with its line number and skipped.
    """
    scenes_path, out_dir = Path(scenes_path), Path(out_dir)
    if not scenes_path.is_file():
        raise FileNotFoundError(f"scenes file not found: {scenes_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.hold_output(str(out_dir), folder=True)  # a second build into it is refused: it would write each video twice
    # everything that shapes a dialogue; --workers is not here: it changes the speed, not the output
    settings = {"interval": interval, "frames_per_turn": frames_per_turn, "random_frac": random_frac,
                "nqna_frac": nqna_frac, "seed": seed, "llm": llm}
    if history_frac:  # only when used: a folder built before the flag existed still resumes
        settings["history_frac"] = history_frac
    settings_path = out_dir / "build.json"
    diff = runs.settings_differ(json.loads(settings_path.read_text()), settings) if settings_path.exists() else ""
    if diff:
        raise ValueError(f"{out_dir} was built with other settings ({diff}); use a new --out or delete it")
    settings_path.write_text(json.dumps(settings) + "\n")
    sft_path, journal = out_dir / "sft.jsonl", out_dir / "anno.jsonl"
    done = {d["id"] for d in _journal(sft_path)}  # sft.jsonl, not the journal: its line is written last
    _journal(journal)  # repair a cut line

    todo, seen, counts = [], set(), {"built": 0, "done_before": 0, "bad_lines": 0, "failed": 0, "nqna": 0, "answers": 0}
    # read every line first: bad lines are reported at once, before an hour of LLM calls
    with open(scenes_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = parse_scene_line(line, scenes_path.parent)
                # the id is both the resume key and anno.json's question_id: it must be unique
                if rec["id"] in seen:
                    raise ValueError(f"id {rec['id']!r} appears twice (give each line an 'id')")
            except ValueError as e:
                _report(f"{scenes_path} line {lineno}: {e}; skipped")
                counts["bad_lines"] += 1
                continue
            seen.add(rec["id"])
            rec["line"] = lineno
            if rec["id"] in done:
                counts["done_before"] += 1
            else:
                todo.append(rec)

    # LLM calls are the slow part at full scale: run videos concurrently, write results in input order
    def build_one(rec):  # a bad video is a result (None, its error), so the other videos go on
        try:
            # a string seed is hashed by random.Random itself (SHA-512), not by hash(): the same every run
            return build_example(rec, writer, random.Random(f"{seed}:{rec['id']}"), out_dir, interval,
                                 frames_per_turn, random_frac, nqna_frac, history_frac), None
        except ValueError as e:
            return None, e

    results = imap(build_one, [(rec,) for rec in todo], workers, desc=f"build {out_dir}", unit="video", leave=True)
    try:
        with open(sft_path, "a") as f_sft, open(journal, "a") as f_gold:
            # results come in input order: a slow video holds back the writing, not the LLM calls
            for rec, (built, error) in zip(todo, results):
                if error is not None:
                    _report(f"{scenes_path} line {rec['line']} ({rec['id']}): {error}; skipped, a re-run tries it again")
                    counts["failed"] += 1
                    continue
                dialogue, example = built
                # gold first: a video counts as done only once its dialogue is written, so a cut
                # between the two leaves a gold line that the resumed build writes again (the later
                # line wins below), never a dialogue without gold
                f_gold.write(json.dumps(example) + "\n")
                f_gold.flush()
                f_sft.write(json.dumps(dialogue) + "\n")
                f_sft.flush()  # one line per video on disk at once: an interruption loses at most one video
                counts["built"] += 1
                counts["nqna"] += len(example["conversation"]) > 1
                counts["answers"] += len(example["answer"])
    finally:
        results.close()  # no worker starts another video: Ctrl-C must not wait for thousands of queued calls

    # anno.json = the journal in sft.jsonl order (a gold line whose dialogue was cut off is dropped)
    gold = {g["question_id"]: g for g in _journal(journal)}
    examples = [gold[d["id"]] for d in _journal(sft_path) if d["id"] in gold]
    runs.write_atomic(out_dir / "anno.json", json.dumps(examples, indent=1) + "\n")  # a reader never sees half of it
    return counts


# ----------------------------------------------------------------------------------------------
# The offline mix (Sec. 4.2: 25k LLaVA-Video QA + 25k Tarsier2 captions, Qwen's default system prompt)

def offline_dialogue(id, video, duration, question, answer, max_frames=OFFLINE_FRAMES):
    """An offline video-QA or caption example as one dialogue in our SFT format.

    One user turn with N frames spread over the whole video, then the question; one assistant
    turn with the answer. The DEFAULT system prompt tells the model this is not a proactive task.
    The interval is duration / (N + 0.5), so mmduet2.read_frames yields exactly N frames
    (int(duration / interval) = N) and the last one lies in the final stretch of the video.
        30 s, 16 frames → interval 1.8182 s, frames at 0, 1.82, ..., 27.27 s
    """
    n = max(1, min(max_frames, int(duration / OFFLINE_MIN_INTERVAL)))  # >= 1: even a tiny clip shows a frame
    interval = round(duration / (n + 0.5), 4)  # + 0.5: duration / interval = n + 0.5, which int() cuts to n
    t = round(n * interval, 3)  # the turn's time: after its n frames (Sec. 4.1's end-of-turn convention)
    # frames_per_turn = n: one user turn holds every frame (an offline example has no turn-taking)
    return {"id": id, "video": video, "interval": interval, "frames_per_turn": n, "messages": [
        {"role": "system", "content": mmduet2.DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": IMAGE * n + question, "time": t},
        {"role": "assistant", "content": answer, "time": t}]}


def build_offline(qa_path, out_path, max_frames=OFFLINE_FRAMES):
    """Lines {"video", "question"?, "answer", "duration"?, "id"?} → one dialogue per line in out_path.

    A line without a question is a caption example (Tarsier2) and gets CAPTION_QUESTION. Paths
    are relative to the input file's folder; a video without "duration" is opened to measure it.
    Returns (written, skipped).
    """
    qa_path, out_path = Path(qa_path), Path(out_path)
    if not qa_path.is_file():
        raise FileNotFoundError(f"offline QA file not found: {qa_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs.hold_output(str(out_path))
    rows, skipped = [], 0
    lines = qa_path.read_text().splitlines()
    for lineno, line in enumerate(tqdm(lines, desc="offline", unit="example", disable=None), 1):
        if not line.strip():
            continue
        try:  # every way a line can be bad ends in the one `except` below: reported, skipped, counted
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("video"), str)
                    and isinstance(rec.get("answer"), str) and rec["answer"].strip()):
                raise ValueError("expected {video, question, answer} with a non-empty answer")
            path = os.path.normpath(os.path.join(qa_path.parent, rec["video"]))
            duration = rec.get("duration") or mmduet2.video_duration(path)  # one-line error if missing/corrupt
        except (ValueError, FileNotFoundError) as e:
            _report(f"{qa_path} line {lineno}: {e}; skipped")
            skipped += 1
            continue
        # an id from the file name and line number is stable across runs; the video path is made
        # relative to the output file's folder, where mmduet2.load_dialogue resolves it
        rows.append(offline_dialogue(str(rec.get("id") or f"{qa_path.stem}-{lineno}"),
                                     os.path.relpath(path, out_path.parent), float(duration),
                                     rec.get("question") or CAPTION_QUESTION, rec["answer"].strip(), max_frames))
    # not resumable (no LLM, so a rerun is cheap): written whole, then renamed, so an interrupted
    # run never leaves half a file that looks finished
    runs.write_atomic(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows), skipped


# ----------------------------------------------------------------------------------------------
# Command line

def make_toy(out, seed=0, n_train=400, n_rl=100, n_test=100, interval=INTERVAL,
             frames_per_turn=FRAMES_PER_TURN, random_frac=0.0, nqna_frac=0.0, history_frac=toy.HISTORY_FRAC, **world):
    """The toy world (toy.py) through this file's pipeline: out/{train,rl,test}/{videos/*.mp4, scenes.jsonl, sft.jsonl,
    anno.json, offline.jsonl}, and test/questions_proactive.json (`toy_streamingbench`); deterministic by seed.

    Each video draws from its own generator (seed, split, index): adding videos to a split does not
    change the ones before. scenes.jsonl keeps each event's colour and position (the ground truth
    drawn in the video). The toy is rebuilt from scratch on every call (a minute), never resumed.
    `world`: keyword overrides of toy.WORLD (the tests' smaller worlds), not checked: the world is toy.WORLD.
    """
    world = {**toy.WORLD, **world}
    runs.hold_output(str(out), folder=True)  # a second toy run would delete this one's videos as it writes them
    counts = {}
    for split, n in (("train", n_train), ("rl", n_rl), ("test", n_test)):
        split_dir = Path(out) / split
        (split_dir / "videos").mkdir(parents=True, exist_ok=True)
        # from scratch: build() would resume the old files, and a smaller --n-train would leave
        # the old extra videos behind
        for old in [*(split_dir / "videos").glob(f"{split}_*.mp4"),
                    *(split_dir / f for f in ("sft.jsonl", "anno.jsonl", "anno.json", "build.json",
                                              "questions_proactive.json"))]:
            old.unlink(missing_ok=True)
        records = []
        if n:  # a line at once, also where no progress bar shows (output not a terminal): this takes a minute
            print(f"data.py toy: writing {n} {split} videos to {split_dir}", flush=True)
        for i in tqdm(range(n), desc=f"toy {split} videos", unit="video", disable=None):
            rng = random.Random(f"toy:{seed}:{split}:{i}")  # the split in the seed: no two splits share a video
            name = f"{split}_{i:04d}"
            duration, events = toy.scenes(rng, **world)
            # the noise seed comes from the video's generator too: the same seed, the same bytes
            toy.render_video(split_dir / "videos" / f"{name}.mp4", duration, events, rng.getrandbits(32), **world)
            records.append({"id": name, "video": f"videos/{name}.mp4", "duration": duration, "scenes": events})
        (split_dir / "scenes.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
        # from here on exactly the path of real data, with the deterministic writer
        counts[split] = build(split_dir / "scenes.jsonl", split_dir, toy.Writer(), interval, frames_per_turn,
                         random_frac, nqna_frac, seed, llm="toy", history_frac=history_frac)
        # the offline mix of Sec. 4.2 in miniature: one whole-video question per video (SFT trains on the train
        # split's, the test split's measure what RL does to offline ability: the paper's Table 4)
        (split_dir / "offline.jsonl").write_text("".join(json.dumps(offline_dialogue(
            f"{r['id']}-offline", r["video"], r["duration"], toy.OFFLINE_QUESTION, toy.colour_list(r["scenes"]))) + "\n"
            for r in records))
        if split == "test" and records:  # the test videos as a StreamingBench Proactive Output file too (Table 5)
            (split_dir / "questions_proactive.json").write_text(json.dumps(toy_streamingbench(records), indent=1) + "\n")
    return counts


def toy_streamingbench(records):
    """The toy's videos in StreamingBench's Proactive Output layout (docs/benchmarks.md): one entry per video,
    one question per square, derived from the scene list (no random number is drawn, so the other files of the
    toy stay as they were).

    Question k: 'When a red square appears, output "Red".', its clip starting (time_stamp) at 0 s for the
    first square and when the square before it has gone for the others (the whole second after its end), so
    each clip's first new square is the one asked about; the ground-truth time is the first whole second at
    which the square is on screen. Times are whole seconds, as the layout's HH:MM:SS are.
        squares red [3.2, 9.0) s, blue [11.5, 17.0) s -> red: time_stamp 00:00:00, truth 00:00:04;
                                                         blue: time_stamp 00:00:09, truth 00:00:12
    """
    out = []
    for r in records:
        questions, clip_start = [], 0
        for s in r["scenes"]:
            output = s["colour"].capitalize()  # as the toy's colour answers say it ("Red."): the check is case-sensitive
            questions.append({"task_type": benchmarks.SB_TASK,
                              "question": toy.PROACTIVE_QUESTION.format(colour=s["colour"], output=output),
                              "time_stamp": benchmarks.hms(clip_start),
                              "ground_truth_time_stamp": benchmarks.hms(math.ceil(s["start"])),
                              "ground_truth_output": output})
            clip_start = math.ceil(s["end"])  # the next clip starts once this square is gone (end is exclusive)
        out.append({"questions": questions, "video_categories": "toy", "video_path": f"./{r['video']}"})
    return out


def placement_arg(text):
    """--placement: "end" (paper) → 0.0, "random" → 1.0, or a number P → random with probability P."""
    named = {"end": 0.0, "random": 1.0}
    try:
        p = named[text] if text in named else float(text)
    except ValueError:
        p = -1.0  # not a number: falls into the one error message below
    if not 0.0 <= p <= 1.0:  # also refuses "nan", which every comparison fails
        raise argparse.ArgumentTypeError(f"expected end, random or a probability in [0, 1], got {text!r}")
    return p


def main(argv=None):
    # a bad flag is one line, as every other bad input (argparse would print the whole usage first)
    parser = runs.argument_parser("data.py", "Scene captions → proactive dialogues + gold spans (paper Sec. 3).")
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    sub = parser.add_subparsers(dest="command", required=True)

    def dialogue_flags(p):
        # dialogue construction (shared by build and toy)
        p.add_argument("--interval", type=float, default=INTERVAL, help="seconds between frames (paper: 2 s in SFT/RL)")
        p.add_argument("--frames-per-turn", type=int, choices=(1, 2), default=FRAMES_PER_TURN,
                       help="frames per user turn (paper: 2)")
        p.add_argument("--placement", type=placement_arg, default="end",
                       help="where an answer sits in its reply span: end (paper), random (a uniform turn in the "
                            "span), or a probability P of random placement per answer")
        p.add_argument("--nqna-frac", type=float, default=NQNA_FRAC, help="share of nQnA dialogues (paper: 0.5)")
        p.add_argument("--history-frac", type=float, default=0.0,
                       help="share of answers also said early in their span as untrained history, then NO REPLY "
                            f"(paper and build: 0; toy: {toy.HISTORY_FRAC})")
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice (each video seeded by its id)")

    b = sub.add_parser("build", help="scene list → sft.jsonl + anno.json (resumable)")
    # input / output
    b.add_argument("--scenes", required=True, type=path,
                   help="JSONL, one line per video: {video, duration, scenes:[{start,end,caption}]}")
    b.add_argument("--out", required=True, type=path,
                   help="output folder (sft.jsonl, anno.json, ...); a re-run resumes it")
    dialogue_flags(b)
    # the LLM (QA generation and immediate-answer summaries)
    b.add_argument("--llm", choices=("openai", "toy"), default="openai",
                   help="openai: an OpenAI-compatible endpoint; toy: the deterministic toy templates")
    b.add_argument("--model", default=None, help="LLM name (default: $JUDGE_MODEL)")
    b.add_argument("--base-url", default=None, help="endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    b.add_argument("--workers", type=int, default=8, help="videos processed at once (LLM requests in flight)")
    b.add_argument("--retries", type=int, default=RETRIES, help="re-asks of a malformed LLM answer before skipping the video")

    o = sub.add_parser("offline", help="offline video QA / captions → one-turn dialogues (default system prompt)")
    o.add_argument("--qa", required=True, type=path,
                   help="JSONL lines {video, question, answer} (no question: a caption example)")
    o.add_argument("--out", required=True, type=path, help="output JSONL of dialogues")
    o.add_argument("--max-frames", type=int, default=OFFLINE_FRAMES, help="frames per example, spread over the video")

    t = sub.add_parser("toy", help="the toy world: synthetic videos → train / rl / test splits")
    # output and sizes
    t.add_argument("--out", required=True, type=path, help="output folder; gets train/, rl/ and test/")
    t.add_argument("--n-train", type=int, default=400, help="videos in the SFT split")
    t.add_argument("--n-rl", type=int, default=100, help="videos held out for GRPO")
    # 100, not 30: on 30 videos a seed's GRPO - SFT gain had a standard error of 2-3 points (docs/toy.md)
    t.add_argument("--n-test", type=int, default=100, help="videos in the test split (anno.json is the benchmark)")
    dialogue_flags(t)
    # the toy world's defaults, the quick start's: history (toy.HISTORY_FRAC's comment), 1QnA only (docs/toy.md);
    # the world itself is toy.WORLD
    t.set_defaults(history_frac=toy.HISTORY_FRAC, nqna_frac=0.0)
    for command in sub.choices.values():  # a sub-command's parser reports its own flags' errors: one line too
        command.error = parser.error
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            runs.hold_output(args.out, folder=True)  # before the LLM client opens its cache in it
            if args.llm == "toy":
                writer, workers = toy.Writer(), 1  # templates: instant, threads would only add overhead
            else:
                # the cache lives with the dataset, so a resumed build re-asks nothing; 4096 tokens: a
                # QA list (4 questions x one answer per scene) is long JSON, and a cut one cannot parse
                client = LLMClient(model=args.model, base_url=args.base_url, max_workers=args.workers,
                                   cache_path=Path(args.out) / "llm_cache.jsonl", max_tokens=4096)
                writer, workers = LLMWriter(client, args.retries), args.workers
            c = build(args.scenes, args.out, writer, args.interval, args.frames_per_turn, args.placement,
                      args.nqna_frac, args.seed, workers, args.llm, args.history_frac)
            print(f"built {c['built']} dialogues ({c['nqna']} nQnA, {c['answers']} gold answers), "
                  f"{c['done_before']} done before, in {args.out}")
            if c["bad_lines"] or c["failed"]:
                raise ValueError(f"{c['bad_lines']} bad input lines and {c['failed']} failed videos skipped "
                                 "(see above); fix them and re-run: built videos are kept")
        elif args.command == "offline":
            written, skipped = build_offline(args.qa, args.out, args.max_frames)
            print(f"wrote {written} offline dialogues to {args.out}")
            if skipped:
                raise ValueError(f"{skipped} lines skipped (see above)")
        else:
            counts = make_toy(args.out, args.seed, args.n_train, args.n_rl, args.n_test, args.interval,
                                  args.frames_per_turn, args.placement, args.nqna_frac, args.history_frac)
            for split, c in counts.items():
                print(f"{split}: {c['built']} videos ({c['nqna']} nQnA), {c['answers']} gold answers")
    except (ValueError, OSError, reward.JudgeError) as e:
        raise SystemExit(f"data.py: {e}") from None  # one line, no traceback


if __name__ == "__main__":
    main()
