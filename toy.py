"""The toy world (docs/toy.md): synthetic videos of coloured squares, built into dialogues by `data.make_toy`.

Role: the first step of the CPU run, in place of scene captioning and the LLM. `python data.py toy --out DIR`
writes train/, rl/ and test/, each with videos/*.mp4, scenes.jsonl (every event's colour and position),
sft.jsonl, anno.json and offline.jsonl (test/ also questions_proactive.json, StreamingBench's layout); the same
--seed gives the same bytes. From the scene list on, the toy goes through `data.build` as real data does (paper
Sec. 3 steps 2-3, SFT placement Sec. 4.2); only the two LLM steps are templates (`Writer`), behind the same
boundary as data.LLMWriter.

The world (WORLD): 84×84 px, 10 fps, 20–40 s; 2–4 events of 5–10 s, each a square of one of 7 colours at the
left, right, top or bottom (the answers name the colour only), at least 2 s apart, none in the first second nor in
the last 4 s (why: beside WORLD and QUIET_END). Not in the paper: a quarter of the answers are also said early in
their span, as untrained history (HISTORY_FRAC).

Run:
    python data.py toy --out data/toy          # train 400, rl 100, test 100 videos: ~3 min on a 2-core CPU
"""
import functools
import re

import av
import numpy as np


# Strongly distinct colours: a tiny vision tower learns colour in minutes (shape it did not learn).
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 235), "yellow": (230, 220, 40),
           "magenta": (220, 50, 220), "cyan": (40, 210, 220), "white": (235, 235, 235)}
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUND = 24  # dark grey
NOISE = 6        # ± grey levels of static per-video noise (static: it costs the encoder nothing)
CRF = 18         # x264 quality: colours survive yuv420p round trips within a few levels
LEAD = 1.0       # no event in the first second
# ... and none in the last 4 s: the benchmark's last turn (often one frame) is then never an answer's
# turn. Where it was, GRPO learnt to say answers again there, and ~half its duplicates sat at that turn.
QUIET_END = 4.0
# 84 px = 3x3 patches of 28 = 9 LLM tokens per frame. Events last at least 5 s = one 4 s turn + one
# 2 s frame - the 1 s reply tail: then, at the paper's frame settings, the end-of-span turn always
# shows the square in its last frame (with 4 s events, ~4% of answers sat at a turn none of whose
# frames had shown the event yet: labels no model can learn). The model cannot see whether the
# square will still be there at the next turn, so replying at a visible turn stays uncertain:
# the exploration room GRPO needs (docs/toy.md, "the exploration trap").
WORLD = dict(size=84, fps=10, min_len=20, max_len=40, min_events=2, max_events=4,
             min_event=5.0, max_event=10.0, gap=2.0)
# The toy's SFT dialogues also say a quarter of the answers early in their span as untrained history
# (--history-frac): with the end placement alone, SFT never saw an answered square stay on screen, and
# the early replies GRPO teaches came with a second reply two turns later (docs/toy.md, "Duplicates").
HISTORY_FRAC = 0.25
QUESTIONS = ("Tell me whenever a new shape appears.", "Tell me the colour of each new shape.")
OFFLINE_QUESTION = "List the colours of the squares in the order they appeared."
# StreamingBench's Proactive Output in the toy: the output as the toy's models name a colour ("Red."), since the
# official check is a case-sensitive substring
PROACTIVE_QUESTION = 'When a {colour} square appears, output "{output}".'
# The answer names the colour, not the side (the square is still drawn at one of four): no toy model learnt the side
# inside the streaming dialogues (right 1 time in 4), so each answer lost a word to a guessed side, and a second
# answer with another side was no repeat to the judge (new information) (docs/toy.md, "What changed")
CAPTION_PATTERN = re.compile(r"A (\w+) square appeared\.")


def caption(colour):
    return f"A {colour} square appeared."


def colour_list(scenes):
    """The toy's offline answer: the squares' colours in the order they appeared, "Red, blue, green."."""
    return ", ".join(s["colour"] for s in scenes).capitalize() + "."


def boxes(size):
    """Top-left corner (y, x) of the square at each position, and its side: even numbers, so the
    yuv420p chroma grid (2x2) never straddles an edge and colours stay clean."""
    # `// 2 * 2` rounds down to even. At 84 px: side 28 (a third of the frame, the pixels of one
    # LLM token), margin 6 from the border, mid 28 (centred), far 50 (6 px from the other border)
    side = size // 3 // 2 * 2
    margin = size // 14 // 2 * 2
    mid, far = (size - side) // 2 // 2 * 2, size - side - margin
    # the four boxes overlap at their corners (left and top share a 6 x 6 px patch at 84 px), which
    # never shows: events do not overlap in time, so a frame holds one square at most
    return {"left": (mid, margin), "right": (mid, far), "top": (margin, mid), "bottom": (far, mid)}, side


def scenes(rng, size=84, fps=10, min_len=20, max_len=40, min_events=2, max_events=4,
           min_event=5.0, max_event=10.0, gap=2.0):
    """(duration, scenes) of one toy video: non-overlapping events at frame-exact times.

    Times are whole frames (k / fps), so "visible" is exact: frame k shows the event iff
    start <= k / fps < end. Events start after LEAD, keep `gap` seconds apart, end QUIET_END before the
    video ends (so their reply spans fit, short of the last turn), and have distinct colours (a second red
    square would read as a repeat to the judge). `size` comes along with the rest of the world dict.
    """
    duration = rng.randint(min_len, max_len)  # whole seconds, so the video is a whole number of frames
    # everything below counts frames (integers), not seconds: no float drift between the scene list
    # and the frames render_video draws
    total, lead, tail, gap_f = duration * fps, round(LEAD * fps), round(QUIET_END * fps), round(gap * fps)
    lo, hi = round(min_event * fps), round(max_event * fps)
    k = rng.randint(min_events, max_events)
    while k > 1 and lead + tail + k * lo + (k - 1) * gap_f > total:
        k -= 1  # the video is too short for this many events
    budget = total - lead - tail - (k - 1) * gap_f  # frames for the events and the spare time between
    lengths = []
    for i in range(k):  # each length leaves room for the minimum length of the rest
        lengths.append(rng.randint(lo, max(lo, min(hi, budget - (k - i - 1) * lo))))
        budget -= lengths[-1]  # what is left is the spare time, handed out below
    rng.shuffle(lengths)  # the first draws have the most room: shuffled, long events are not always first
    extra = sorted(rng.randint(0, budget) for _ in range(k))  # the spare frames, spread before each event
    colours = rng.sample(sorted(COLOURS), k)  # distinct; sample needs a sequence, not a dict
    events, t, used = [], lead, 0
    for length, shift, colour in zip(lengths, extra, colours):
        # extra holds cumulative offsets: this event waits shift - used spare frames more than the
        # last; whatever extra[-1] leaves of the budget falls after the last event
        t += shift - used
        used = shift
        position = rng.choice(POSITIONS)  # positions may repeat: colours tell events apart
        events.append({"start": t / fps, "end": (t + length) / fps, "caption": caption(colour),
                       "colour": colour, "position": position})
        t += length + gap_f
    return float(duration), events


@functools.cache  # read once per process, not per video
def x264_options(cpuinfo="/proc/cpuinfo"):
    """libx264's options for the toy videos: the quality, and on a CPU with AVX-512 the instruction sets to use.

    x264's AVX-512 code wrote the same frames with other bytes now and then (on a 2-core Xeon VM, 9 of 240
    toy worlds written in two loops at once; always the bottom-right 16x16 block, which 84 px only partly
    fills); told to use AVX2 at most, it wrote the same bytes as AVX-512 does when right, in 480 of 480.
    Only where AVX-512 is there (which has AVX2, BMI2 and LZCNT beside it): elsewhere x264 picks no AVX-512.
    """
    try:
        with open(cpuinfo) as f:  # Linux; another system keeps x264's own choice
            avx512 = "avx512" in f.read()
    except OSError:
        avx512 = False
    return {"crf": str(CRF), **({"x264-params": "asm=AVX2,BMI2,LZCNT,Cache64"} if avx512 else {})}


def render_video(path, duration, events, seed, size=84, fps=10, **_):
    """Write the toy mp4 (libx264, yuv420p): static noisy background, one square per visible event.

    Takes the whole world dict as keywords (`**_`: the knobs that only shape the scene list)."""
    # the same noise in every frame: it costs the encoder nothing, and a frame changes only where
    # a square comes or goes
    noise = np.random.default_rng(seed).integers(-NOISE, NOISE + 1, (size, size, 1))
    # one channel of noise copied into R, G and B: grey static
    background = np.repeat(np.clip(BACKGROUND + noise, 0, 255), 3, axis=2).astype(np.uint8)  # (H, W, 3)
    corners, side = boxes(size)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"  # colour stored per 2x2 pixel block: hence boxes' even edges
        stream.options = dict(x264_options())  # a copy: the cached dict stays as it is
        for k in range(round(duration * fps)):
            frame = background.copy()
            for s in events:
                # the scene times are k / fps (`scenes`), so round() gets the exact frame index back
                if round(s["start"] * fps) <= k < round(s["end"] * fps):
                    y, x = corners[s["position"]]
                    frame[y:y + side, x:x + side] = COLOURS[s["colour"]]
            for packet in stream.encode(yuv_frame(frame)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def yuv_frame(rgb):
    """An (H, W, 3) uint8 RGB array as a yuv420p frame for the encoder in which every byte is set, padding included.

    A frame's rows are padded for alignment, and FFmpeg's converter leaves that padding as it found it
    (uninitialised memory). x264 reads some of it, so an rgb24 frame handed to `encode` made the same video
    encode to different bytes from run to run (13 of 530 toy videos, decoded pixels 1-2 levels apart).
    """
    h, w, _ = rgb.shape
    yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()  # (H·3/2, W)
    # to_ndarray packs the half-size U and V planes as H/4 rows of W each: unpack them to (H/2, W/2)
    planes = [yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2)]
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, pixels in zip(frame.planes, planes):
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)  # (rows, bytes per row with padding)
        rows[:] = 0  # the padding, deterministically
        rows[:, :pixels.shape[1]] = pixels
    return frame


class Writer:
    """The toy world's deterministic stand-in for the LLM: templates over the toy captions.

    Questions: "whenever a new shape appears" (answer = the caption) and "the colour of each new
    shape" (answer e.g. "Red."); every scene answers both. Summary: "So far: " + the answers.
    """

    def questions(self, captions, n):
        parsed = [CAPTION_PATTERN.fullmatch(c.strip()) for c in captions]
        if not all(parsed):
            raise ValueError("the toy writer reads only toy captions ('A red square appeared.')")
        by_question = {QUESTIONS[0]: [c.strip() for c in captions],
                       QUESTIONS[1]: [f"{m.group(1).capitalize()}." for m in parsed]}
        # two templates only: the toy's videos (under 60 s) ask for n = 2; a longer one gets these two
        return [{"question": q, "answers": a} for q, a in list(by_question.items())[:n]]

    def summarise(self, question, answers):
        return "So far: " + " ".join(answers)
