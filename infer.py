"""Streaming inference: watch a video as a multi-turn chat and answer (or stay silent) every turn.

The last stage (data -> SFT -> GRPO -> infer), the paper's inference protocol (Sec. 4.1, 5.1, Appendix A):
every user turn brings 1-2 frames, one every --interval s, plus any text that arrived meanwhile; the model
(the KV-cached `engine.Stream`) answers with a reply or exactly "NO REPLY", greedy, <= 100 new tokens.
A camera or network stream is watched live (docs/streaming.md, "Live sources"); predictions are written
in the ProactiveVideoQA format (docs/formats.md); what is refused, skipped or resumed: docs/reliability.md.
--benchmark also runs StreamingBench's Proactive Output and offline QA files, told apart by their fields
(benchmarks.py; their protocols: docs/benchmarks.md).
Departures (docs/departures.md): frames capped at 128 tokens (--frame-tokens); a user text joins the
first turn at or after its time; live, the frames a slow model has no time for are dropped; watching keeps at
most 90 frames in the context (--context-frames, engine.Window; a benchmark keeps all unless asked).

    python infer.py --demo --html demo.html          # a new toy video through toy-model/, and its timeline page
    python infer.py video.mp4 --question "What is the person cooking?"           # the released model
    python infer.py video.mp4 --model tiny --ask 5:"What now?" --out pred.jsonl   # CPU smoke run
    python infer.py video.mp4 --model tiny --realtime    # a file played as live: type questions as it plays
    python infer.py /dev/video0 --question "Tell me when someone comes in." # webcam (macOS: 0 --input-format avfoundation)
    python infer.py video.mp4 --realtime --serve 127.0.0.1:8000    # and watch it at http://127.0.0.1:8000/ (docs/live.md)
    python infer.py rtsp://camera.local/stream --out pred.jsonl     # network stream (also http(s)://, HLS .m3u8)
    python infer.py --benchmark WEB/anno.json --videos WEB/videos --out preds.jsonl   # EGO/TV/VAD: --frames-per-turn 2
    python evaluate.py --gold WEB/anno.json --pred preds.jsonl --judge openai
    python infer.py --benchmark questions_proactive.json --videos SB/src --out sb.jsonl   # StreamingBench PO (Table 5)
    python infer.py --benchmark data/toy/test/offline.jsonl --model runs/sft-toy/final --out off.jsonl  # offline QA
"""
import functools
import itertools
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import torch
from tqdm import tqdm

import benchmarks
import engine
import live
import mmduet2
import reward
import runs


clock = mmduet2.clock  # stream time as [mm:ss]: 62.5 -> 01:02.5


def video_turns(video, interval, frames_per_turn=1, rounds=None, start=0.0):
    """Yield (t, frames) for each user turn, reading frames lazily (never the whole video).

    A turn holds `frames_per_turn` frames; the last may hold fewer. t = frames fed so far x interval,
    taken at the end of the turn's frames (Sec. 4.1). rounds caps the number of FRAMES streamed. start:
    the clip begins there (StreamingBench's time_stamp), and t stays on the video's clock (start + ...).
        7 frames, 1 s, 2 per turn -> (2, [f0, f1]), (4, [f2, f3]), (6, [f4, f5]), (7, [f6])
    """
    n, frames = 0, []  # n: frames read so far
    for _, frame in itertools.islice(mmduet2.read_frames(video, interval, start), rounds):  # rounds None: all
        n += 1
        frames.append(frame)
        if len(frames) == frames_per_turn:
            # the turn's time is when its last frame has been seen: frame n-1 sits at (n-1)·interval,
            # and the turn closes one interval later (mmduet2.turn_times, the same rule)
            yield start + n * interval, frames
            frames = []
    if frames:  # a last turn with fewer frames
        yield start + n * interval, frames


def stream_video(stream, video, interval=1.0, frames_per_turn=1, user_turns=(), rounds=None,
                 on_reply=None, keep_silent=False, on_turn=None, responses=None, latencies=None,
                 questions=None, on_text=None, start=0.0, **decode):
    """Stream `video` through an `engine.Stream`, one user turn at a time. Returns (responses, latencies).

    video: a file (read with decord, every frame: interval, frames_per_turn and rounds apply), or a
    live.Feed (a live source, or a file paced as one: its frames come as it plays, dropped when the model
    is behind; its lags get each turn's). start: a file is streamed from there (video_turns); a user
    text's time and a turn's are on the video's clock. user_turns: [(time, text)]; each text joins the first user
    turn whose time >= its time, after that turn's frames (texts meeting in one turn are joined by
    mmduet2.turn_text; texts later than the last turn are never seen). questions: a queue.Queue of
    texts typed while the stream plays; each joins the turn fed next. rounds: frames to stream (None:
    the whole video). on_reply(t, text) is called on each non-silent reply as soon as it exists,
    on_text(t, text) on each user turn's text, on_turn(t, frames, text, reply) after every turn (a progress
    bar, the --serve page). stream: an engine.Stream, or an engine.Window (a bounded context, --context-frames).
    decode: options of `Stream.turn`.
    responses: the benchmark's `model_response_list`: the user turns that carry text and the
    replies (NO REPLY turns too when keep_silent), each {"role", "content", "time"}.
    latencies: seconds of model time per user turn (frame decoding and waiting excluded).
    Both are filled as the turns come: pass your own lists to keep what was streamed when a frame
    fails to decode part-way, a live stream breaks off, or the run is interrupted.
        5 frames, 1 s, 2 per turn, user_turns [(0, "Q?")] -> turns at t = 2, 4, 5; "Q?" joins t = 2
    """
    pending = sorted(user_turns, key=lambda u: u[0])  # texts the model has not seen yet
    responses = [] if responses is None else responses
    latencies = [] if latencies is None else latencies
    feed = video if isinstance(video, live.Feed) else None
    # a live.Feed times its turns on the stream's clock (and drops frames); a file's come as fast as the model takes them
    turns = feed.turns() if feed else video_turns(video, interval, frames_per_turn, rounds, start)
    try:
        for t, frames in turns:
            # a departure (docs/departures.md): a text joins the first turn whose time >= its own, after that
            # turn's frames (encode_user puts frames first), so the question at t=0 lands in the first turn
            texts = []
            while pending and pending[0][0] <= t + 1e-9:  # the epsilon absorbs float error (3 x 0.1 s)
                texts.append(pending.pop(0)[1])
            while questions is not None and not questions.empty():  # typed since the last turn: they join this one
                texts.append(questions.get())
            text = mmduet2.turn_text(texts)
            if text and on_text:
                on_text(t, text)
            tic = time.perf_counter()  # latency: the model's time only, not decoding frames or waiting for them
            # 1-2 frames (+ text) in, a reply or NO REPLY out; a Window keeps the turn's time with its text
            at = {"t": t} if isinstance(stream, engine.Window) else {}
            reply = stream.turn(frames, text, **decode, **at)
            latencies.append(time.perf_counter() - tic)
            if feed:  # how long after its frames' turn time the reply came: stays bounded, as frames are dropped
                feed.lags.append(feed.now() - t)
            # the benchmark's record of the turn (docs/formats.md); times rounded so that 3 x 0.1 s is 0.3
            if text:
                responses.append({"role": "user", "content": text, "time": round(t, 6)})
            if not reply.silent or keep_silent:
                responses.append({"role": "assistant", "content": reply.text.strip(), "time": round(t, 6)})
            if on_reply and not reply.silent:
                on_reply(t, reply.text.strip())
            if on_turn:
                on_turn(t, frames, text, reply)
    finally:
        turns.close()  # a live.Feed's reader stops with it (Ctrl-C, an error), and lets go of its source
    return responses, latencies


def check_video(path, interval):
    """Fail early (before a 3B model loads) on a missing, corrupt or too-short video:
    (first frame, frames it gives, its duration in s)."""
    _, first = next(mmduet2.read_frames(path, interval))  # raises the one-line errors of mmduet2
    duration = mmduet2.video_duration(path)
    return first, mmduet2.count_frames(duration, interval), duration  # read_frames' own count


def parse_asks(specs, end):
    """--ask SECONDS:TEXT -> [(seconds, text)]; malformed or later than the last turn (`end`) is an error."""
    asks = []
    for spec in specs:
        seconds, sep, text = spec.partition(":")
        try:
            t = float(seconds)
        except ValueError:
            t = -1.0  # not a number: falls into the one error message below
        if not sep or not text.strip() or not math.isfinite(t) or t < 0:
            raise ValueError(f"--ask {spec!r} is not SECONDS:TEXT (e.g. --ask '12:What is he holding?')")
        if t > end:
            raise ValueError(f"--ask {spec!r}: {t:g} s is past the end of the video (last turn at {end:g} s)")
        asks.append((t, text.strip()))
    return asks


def benchmark_inputs(ex, videos, interval):
    """(video path, user turns, frames to stream, start) of one anno.json example (paper Sec. 5.1).

    The question (conversation[0], t=0) and any subtitles at their times; frames up to the end of
    the last gold reply span (`reward.stream_rounds`). The fields were checked by `reward.load_gold`.
    """
    # a user message without a time is the question, at t=0
    user_turns = [(c.get("time", 0.0), c["content"]) for c in ex["conversation"] if c["role"] == "user"]
    # stream_rounds takes frames per second: 1 / interval
    return os.path.join(videos, ex["video"]), user_turns, reward.stream_rounds(ex, 1 / interval), 0.0


def streamingbench_inputs(q, root, interval):
    """(video path, user turns, frames to stream, start) of one StreamingBench Proactive Output question
    (Table 5; docs/benchmarks.md): the clip from its time_stamp, the question in the clip's first user turn,
    frames up to the ground-truth time + 4 s, where the official polling stops. The official protocol asks
    "is it the right time to output ...?" every second; a proactive model is its own poll: it answers every
    turn anyway, and its first reply is its answer (a departure: docs/departures.md)."""
    return os.path.join(root, q["video"]), [(q["start"], q["question"])], benchmarks.sb_frames(q, interval), q["start"]


def offline_inputs(ex, root, interval):
    """(video path, user turns, frames, start) of one offline QA dialogue (Table 4 in miniature): the frames
    and their interval are the dialogue's own (`data.py offline`), whatever --interval says."""
    rec = ex["record"]
    return os.path.join(root, rec["video"]), [(ex["time"], ex["question"])], ex["frames"], 0.0


def done_ids(path, known):
    """question_ids already in a prediction JSONL (a benchmark run resumes after them).

    A line that is not a record, or a question_id that is not in the benchmark (`known`: another
    benchmark's predictions), is an error: appending to such a file would mix two runs.
    """
    ids = set()
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 fails below like any other non-record
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    ids.add(json.loads(line)["question_id"])
                except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bad UTF-8
                    raise ValueError(f"{path} line {n} is not a prediction record: delete that line and rerun "
                                     "(a last line cut by an interrupted write is repaired by itself)") from None
    if ids - known:
        raise ValueError(f"{path} holds question_ids that are not in this benchmark (e.g. {sorted(ids - known)[0]!r}): "
                         "another benchmark's predictions? give another --out")
    return ids


def repair_last_line(path):
    """A last line without its newline, before a resumed run appends: a record cut by a run killed
    mid-write is removed (its example runs again); a whole one (cut just before its newline, or written by
    hand) gets the newline, so the next record starts a line of its own. Returns what was done, or None."""
    with open(path, "rb+") as f:
        text = f.read()  # one line per example: small enough to read whole
        if not text or text.endswith(b"\n"):
            return None
        start = text.rfind(b"\n") + 1  # where the last line begins (0: it is the only one)
        try:
            json.loads(text[start:])["question_id"]
        except (ValueError, KeyError, TypeError):  # not a whole record: the rest of it was never written
            f.truncate(start)
            return "its last line was cut short (a run stopped mid-write): removed, and its example runs again"
        f.write(b"\n")
        return "its last record lacked a newline: added one, so new records start a line of their own"


def append_record(path, line):
    """Append one line to `path`, whole or not at all: a write that fails part-way (a full disk) is cut back
    off, so the file holds whole records only, and the error goes on to the caller."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:  # a write may take less than all of it (a disk nearly full): the rest goes next
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, end)  # what got in goes again: no half record for the next run to trip on
            raise
    finally:
        os.close(fd)


def run_settings(args):
    """What decides a benchmark run's predictions: a resume must match the run that made the file."""
    model = os.path.realpath(args.model) if os.path.isdir(args.model) else args.model  # one folder, one name
    settings = {"model": model, "interval": args.interval, "frames_per_turn": args.frames_per_turn,
                "frame_tokens": args.frame_tokens, "max_new_tokens": args.max_new_tokens}
    if args.realtime:  # played as live, frames are dropped: other predictions (recorded only when on: old records match)
        settings["realtime"] = True
    if args.context_frames:  # a bounded context: other predictions (recorded only when given, as --realtime)
        settings["context_frames"] = args.context_frames
    return settings


def resume_state(out, sidecar, settings, known):
    """(question_ids done, {question_id: why skipped}) of an earlier run into `out`, if its settings match.

    `sidecar` (OUT.run.json, written before the first record) holds the settings that made `out`
    and the examples that were skipped, with the reason. A file with records but no sidecar, or one
    made with other settings, is refused: resuming would mix two runs' predictions in one file.
    """
    if not os.path.exists(out):
        return set(), {}  # a new run (an old sidecar without its file is replaced)
    done = done_ids(out, known)
    if not os.path.exists(sidecar):
        if done:
            raise ValueError(f"{out} has predictions but no {sidecar} saying which settings made them: "
                             "give another --out, or --overwrite to start over")
        return done, {}
    try:
        record = json.load(open(sidecar))
        old, skipped = record["settings"], record["skipped"]
        if not (isinstance(old, dict) and isinstance(skipped, dict)):
            raise TypeError
    except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"{sidecar} is not infer.py's record of a run: give another --out, "
                         "or --overwrite to start over") from None
    # every setting either side names: one only the old run recorded counts too (e.g. --realtime)
    differ = [f"--{k.replace('_', '-')} {old.get(k)} (this run: {settings.get(k)})"
              for k in runs.differing(old, settings)]
    if differ:
        raise ValueError(f"{out} was made with {', '.join(differ)}: resume with those settings, "
                         "or give another --out (--overwrite starts over)")
    return done, skipped


def check_out(out, inputs):
    """--out must be a file we may create in a folder that exists, and never one of our inputs:
    checked at start-up, so that no work is streamed only to be lost at the end."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: folder {folder} does not exist (create it first)")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {os.path.join(out, 'preds.jsonl')}")
    if not os.access(folder, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out}: not writable here")
    # samefile, not name equality: a link or another spelling of the same path is caught too
    if any(os.path.exists(out) and os.path.samefile(out, x) for x in inputs if x and os.path.exists(x)):
        raise ValueError(f"--out {out} is an input of this run: give another file")


def latency_line(latencies):
    """Mean and 95th percentile of per-turn model time, in ms."""
    if not latencies:
        return "n/a"
    ms = sorted(1000 * x for x in latencies)
    p95 = ms[max(0, math.ceil(0.95 * len(ms)) - 1)]  # nearest-rank percentile
    return f"mean {sum(ms) / len(ms):.0f} ms, p95 {p95:.0f} ms"


CONTEXT_FRAMES = 90  # --context-frames' default when watching: the released RL recipe's cap on frames per episode


def parse_args(argv):
    # a bad flag is one line, as every other bad input (argparse would print the whole usage first)
    p = runs.argument_parser("infer.py", "Stream a video, a camera, a network stream (or a ProactiveVideoQA "
                                            "benchmark) through MMDuet2.")
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    # what to watch
    p.add_argument("video", nargs="?", metavar="SOURCE", type=path,
                   help="video file, camera (/dev/video0) or network stream (http(s)://, HLS .m3u8, rtsp://) "
                        "to watch; a camera or stream is watched live (or use --benchmark)")
    p.add_argument("--input-format", metavar="FMT",
                   help="PyAV (FFmpeg) input format of a live SOURCE: v4l2 for a Linux camera (the default for "
                        "/dev/video*), avfoundation on macOS (SOURCE 0: the first camera), dshow on Windows "
                        "(SOURCE 'video=CAMERA NAME'), lavfi for a test pattern (SOURCE testsrc)")
    p.add_argument("--question", help="question asked at t=0, in the first user turn (after its frames)")
    p.add_argument("--ask", action="append", default=[], metavar="SECONDS:TEXT",
                   help="text put into the first user turn whose time >= SECONDS (of stream time, live); "
                        "repeatable. Live or --realtime, a line typed on stdin joins the turn being fed")
    p.add_argument("--benchmark", metavar="ANNO_JSON", type=path,
                   help="run a benchmark's protocol: a ProactiveVideoQA anno.json, StreamingBench's "
                        "questions_proactive.json or offline QA dialogues (data.py offline), told apart by their fields")
    p.add_argument("--videos", metavar="DIR", type=path,
                   help="folder of the benchmark's videos (default: ProactiveVideoQA, videos/ beside ANNO_JSON; "
                        "StreamingBench and offline QA, the file's folder, which their video paths are relative to)")
    p.add_argument("--demo", type=int, nargs="?", const=0, metavar="SEED",
                   help="write a toy video (data.py toy, seed SEED) and stream it through the shipped toy model")
    p.add_argument("--html", metavar="FILE", type=path,
                   help="with --demo: also write its timeline page (as evaluate.py --html): the replies "
                        "against the gold events, scored offline")
    p.add_argument("--out", type=path,
                   help="prediction JSONL; single video: a new file; benchmark: appended, resumable "
                        "(its settings and skipped examples are kept in OUT.run.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (single video: refused without it; benchmark: start over)")
    p.add_argument("--retry-skipped", action="store_true",
                   help="benchmark: run again the examples an earlier run skipped (listed in OUT.run.json)")
    # model
    p.add_argument("--model", default=mmduet2.DEFAULT_MODEL,
                   help="hub name, local folder, or 'tiny' (a random model built in-process, for smoke runs)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attn", default=None, help="attention implementation, e.g. sdpa or flash_attention_2")
    # frames (paper: 1 s interval at inference, 1 frame per turn for [WEB], 2 for [EGO]/[TV]/[VAD])
    p.add_argument("--interval", type=float, default=1.0, help="seconds between sampled frames (paper: 1.0)")
    p.add_argument("--frames-per-turn", type=int, choices=[1, 2], default=1,
                   help="frames in each user turn (paper: 1 for [WEB], 2 for [EGO], [TV], [VAD])")
    p.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS,
                   help="max LLM tokens per frame, i.e. max_pixels = N*28*28 (paper training: 128)")
    # decoding (greedy, as in the paper)
    p.add_argument("--max-new-tokens", type=int, default=100, help="cap on each reply's tokens (paper: 100)")
    p.add_argument("--context-frames", type=int, default=None, metavar="N",
                   help="keep at most N frames in the model's context, the questions and latest replies of older "
                        "turns as text (docs/live.md); 0 = every frame, as the paper (default: 90, the RL recipe's "
                        "cap, watching a video or live source; 0 for a benchmark)")
    p.add_argument("--serve", metavar="HOST:PORT",
                   help="also show the stream on a page at http://HOST:PORT/ (its last frame, the replies, a box "
                        "for questions; standard library only, docs/live.md), e.g. 127.0.0.1:8000")
    p.add_argument("--realtime", action="store_true",
                   help="watch a file as a live stream: at wall-clock speed, dropping the frames the model is too "
                        "slow for (a camera or network stream always is)")
    args = p.parse_args(argv)
    if args.demo is not None:  # the demo makes up its own arguments (run_demo): only --html goes with it
        return args
    # flags that contradict each other, or bad values: one line each, before anything is opened. SystemExit with
    # the message (code 1), as every bad input of this script, not p.error (code 2, plus "--help lists the flags")
    for bad, message in (
            (args.html, "--html is for --demo; for a benchmark run: evaluate.py ... --html FILE"),
            ((args.video is None) == (args.benchmark is None), "give either a VIDEO or --benchmark ANNO_JSON"),
            (args.video and args.video.endswith(".json"),
             f"{args.video} is not a video: for a benchmark, --benchmark {args.video} --out FILE.jsonl"),
            (args.benchmark and not args.out, "--benchmark needs --out FILE.jsonl"),
            (args.benchmark and (args.question or args.ask),
             "--question/--ask are for a single VIDEO; a benchmark brings its own questions"),
            (args.benchmark and args.input_format,
             "--input-format is for a live SOURCE (a camera); a benchmark reads video files"),
            (args.benchmark and args.serve, "--serve is for a single VIDEO or live SOURCE"),
            (args.serve and not serve_address(args.serve), f"--serve {args.serve} is not HOST:PORT (e.g. 127.0.0.1:8000)"),
            (not 0 < args.interval < math.inf or args.frame_tokens < 4 or args.max_new_tokens < 1,
             "--interval must be > 0 (and finite), --frame-tokens >= 4, --max-new-tokens >= 1"),
            (args.context_frames is not None and 0 < args.context_frames < args.frames_per_turn or
             (args.context_frames or 0) < 0, "--context-frames must be 0 (every frame) or >= --frames-per-turn")):
        if bad:
            raise SystemExit(f"infer.py: {message}")
    if args.device and (problem := device_problem(args.device)):
        raise SystemExit(f"infer.py: {problem}")
    if args.context_frames is None:  # watching has no end; a benchmark stays the paper's protocol unless asked
        args.context_frames = 0 if args.benchmark else CONTEXT_FRAMES
    return args


def serve_address(spec):
    """--serve HOST:PORT -> (host, port), or None when it is not one (port 0: any free one). IPv4 or a name only:
    the page's server (http.server) listens on IPv4."""
    host, _, port = spec.rpartition(":")
    return (host, int(port)) if host and ":" not in host and port.isdigit() and int(port) < 65536 else None


def open_page(spec):
    """The --serve page's socket, opened before the model loads: a port in use is one line, at once."""
    host, port = serve_address(spec)
    try:
        return live.Page(host, port)
    except OSError as e:
        raise ValueError(f"--serve {spec}: cannot listen there ({e.strerror or e})") from None


def device_problem(name):
    """Why --device NAME cannot run on this machine, or None (torch would say so only after the model load)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPUs (use --device cpu)"
    return None


# ----------------------------------------------------------------------------
# One video or live source: replies printed as they come, above the turn counter


def check_source(args):
    """The single VIDEO (a file, a camera, a network stream), checked before the model loads:
    (its first frame, the frames it gives (None: live, no end known), the user turns [(t, text)])."""
    if args.out and os.path.exists(args.out) and not args.overwrite:  # one video's output is never resumed
        raise ValueError(f"--out {args.out} exists: give another file, or --overwrite to replace it")
    if live.is_live(args.video, args.input_format):  # opened now and again when the model is ready: a wrong URL fails now
        first, n_frames, end = live.check_live(args.video, args.interval, args.input_format), None, math.inf
    else:
        first, n_frames, _ = check_video(args.video, args.interval)
        end = n_frames * args.interval  # the last turn's time
    # --question is asked at t=0: it joins the first turn, after that turn's frames (a departure: docs/departures.md)
    return first, n_frames, ([(0.0, args.question)] if args.question else []) + parse_asks(args.ask, end)


def print_reply(t, text):
    """A reply, above the turn counter; t: the turn's time on the video's (or the live stream's) clock."""
    tqdm.write(f"[{clock(t)}] {text or '(a blank reply)'}")


def print_text(t, text):
    """Live (or --realtime): a user text (typed, --question, --ask) in the turn it joined, above the counter."""
    tqdm.write(f"[{clock(t)}] > {text}")


def turn_done(bar, feed=None, page=None, *turn):
    """After every turn: the turn counter and, live, how far behind the stream the model is; the page's new turn."""
    if page:
        page.publish(*turn)  # (t, frames, text, reply)
    bar.update()
    if feed:
        bar.set_postfix_str(f"{feed.lags[-1]:.1f} s behind, {feed.dropped} frames dropped", refresh=False)


def window_report(window):
    """What a bounded context dropped, and what its rebuilds cost."""
    ms = sorted(1000 * s for s in window.rebuild_s)
    shown = sum(role == "assistant" for _, role, _ in window.memory)
    return (f"context: at most {window.frames} frames; rebuilt {window.rebuilds} times (each keeping at most "
            f"{window.frames - window.step} frames; median {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms); "
            f"{window.dropped_frames} frames dropped, their "
            f"texts kept as text: {len(window.memory) - shown} questions and the latest {shown} replies "
            f"({window.hidden['user']} questions and {window.hidden['assistant']} replies no longer shown)")


def watch(args, model, processor, decode, n_frames, user_turns, page=None):
    """Stream one video or live source; write its turns to --out (also when it ends early) and sum them up.
    page: the --serve page (live.Page), shown each turn and told when the stream ends."""
    source = n_frames is None  # a camera or a stream: no end known
    stream = engine.Stream(model, processor)  # one conversation (and KV cache) per video
    window = engine.Window(stream, args.context_frames) if args.context_frames else None  # a bounded context
    responses, latencies, failure, code = [], [], None, 0
    feed, questions = None, page and page.questions  # a file played at model speed needs no feed
    if source or args.realtime:  # frames come as the stream plays, dropped when the model is behind
        frames = live.live_frames(args.video, args.interval, args.input_format) if source \
            else mmduet2.read_frames(args.video, args.interval)
        feed, questions = live.Feed(frames, args.interval, args.frames_per_turn), questions or queue.Queue()
        sys.stdout.reconfigure(line_buffering=True)  # each reply shows when it comes, through a pipe (tee) too
        # daemon: a read blocked on stdin never holds up the exit
        threading.Thread(target=live.read_questions, args=(sys.stdin, questions), daemon=True).start()
        print("watching as it plays: type a question and Enter at any time (it joins the turn being fed); "
              "Ctrl-C stops")
    if page:
        page.start()
        print(f"the page: {page.url} (replies, the last frame, a box for questions)")
    n_turns = None if source else math.ceil(n_frames / args.frames_per_turn)  # at most, when frames are dropped
    with tqdm(total=n_turns, desc="turns", unit="turn", leave=False,
              bar_format="turns: {n} [{elapsed}{postfix}]" if source else None) as bar:  # no end: a count
        try:
            stream_video(window or stream, feed or args.video, args.interval, args.frames_per_turn, user_turns,
                         on_reply=print_reply, on_turn=functools.partial(turn_done, bar, feed, page), questions=questions,
                         on_text=print_text if feed else None, responses=responses, latencies=latencies, **decode)
        except (OSError, ValueError) as e:  # a frame failed to decode, a stream broke off: the turns before stand
            failure, code = f"infer.py: {e}", 1
        except KeyboardInterrupt:
            of = f" of {n_turns}" if not feed else ""
            failure, code = f"infer.py: interrupted after {len(latencies)}{of} turns", 130
    try:
        if args.out:  # written when the video ends early too (first: the page's end may take seconds)
            name = urllib.parse.urlparse(args.video).path if source else args.video  # a URL's query is no name
            qid = os.path.splitext(os.path.basename(name))[0] or "source"
            try:
                runs.write_atomic(args.out, json.dumps({"question_id": qid, "model_response_list": responses}) + "\n")
            except OSError as e:  # a full disk: the old file, if any, is left as it was
                raise SystemExit(f"infer.py: cannot write {args.out} ({e.strerror}): the predictions of the "
                                 f"{len(latencies)} turns streamed are not saved; free some space and rerun") from None
    finally:
        if page:  # the page says that the stream ended, and why
            page.end(failure.removeprefix("infer.py: ") if failure else f"all {len(latencies)} turns answered")
    n_replies = sum(r["role"] == "assistant" for r in responses)
    if feed:
        print(feed.report())
    if window and window.rebuilds:
        print(window_report(window))
    if failure:
        kept = f"; the predictions of the {len(latencies)} turns streamed are in {args.out}" if args.out else ""
        print(failure + kept, file=sys.stderr)
        raise SystemExit(code)
    # real-time factor = model time / video time: below 1 the model keeps up with a source stream
    span = feed.now() if source else n_frames * args.interval  # a source: the stream time watched; a file: its last turn's
    print(f"{len(latencies)} turns, {n_replies} replies; per-turn latency {latency_line(latencies)}; "
          f"real-time factor {sum(latencies) / max(span, 1e-9):.2f}")
    summary = {"turns": len(latencies), "replies": n_replies, "latencies": latencies}
    if feed:
        summary.update(taken=feed.taken, dropped=feed.dropped, lags=feed.lags)
    return summary


# ----------------------------------------------------------------------------
# A benchmark (Sec. 5.1): the question at t=0, subtitles at their times, frames to the last gold span


def check_benchmark(args):
    """The benchmark's examples and what an earlier run into --out left, checked before the model loads:
    ({question_id: (video path, user turns, frames to stream, start)}, {question_id: example}, ids done,
    {id: why skipped}). The benchmark is told by its fields (`benchmarks.detect`): a ProactiveVideoQA
    anno.json, StreamingBench's questions_proactive.json, or offline QA dialogues (data.py offline)."""
    if os.path.isdir(args.benchmark):
        raise ValueError(f"--benchmark {args.benchmark} is a folder: give its anno.json")
    if not os.path.isfile(args.benchmark):
        raise ValueError(f"--benchmark {args.benchmark}: file not found")
    args.kind = benchmarks.detect(args.benchmark)
    if args.kind == "proactivevideoqa":
        examples = reward.load_gold(args.benchmark)  # checks every field (stream_rounds needs durations, spans)
        args.videos = args.videos or os.path.join(os.path.dirname(args.benchmark), "videos")
        inputs = benchmark_inputs
    else:  # their video paths are relative to the file's folder (StreamingBench: "./videos/x.mp4"), or to --videos
        load = benchmarks.load_streamingbench if args.kind == "streamingbench" else benchmarks.load_offline
        examples = load(args.benchmark)
        args.videos = args.videos or os.path.dirname(args.benchmark) or "."
        inputs = streamingbench_inputs if args.kind == "streamingbench" else offline_inputs
    if not os.path.isdir(args.videos):
        raise ValueError(f"videos folder not found: {args.videos} (give --videos DIR)")
    plans = {ex["question_id"]: inputs(ex, args.videos, args.interval) for ex in examples}
    # a resume: the examples already written, and those an earlier run skipped (refused if the
    # settings differ, so one file never mixes two runs' predictions)
    if not args.overwrite and os.path.exists(args.out) and (repaired := repair_last_line(args.out)):
        print(f"{args.out}: {repaired}")
    done, skipped = (set(), {}) if args.overwrite else resume_state(args.out, args.out + ".run.json",
                                                                   run_settings(args), set(plans))
    return plans, {ex["question_id"]: ex for ex in examples}, done, skipped


def record_run(sidecar, settings, skipped):
    """OUT.run.json: this run's settings and the examples skipped so far, with why."""
    runs.write_atomic(sidecar, json.dumps({"settings": settings, "skipped": skipped}, indent=1) + "\n")


def stream_example(args, model, processor, decode, ex, plan, sizes, warned):
    """One example through a fresh Stream (a new conversation and KV cache): (responses, latencies).
    Its frame size and gold warnings are counted into `sizes` and `warned` first, also when it is then skipped:
    a missing, unreadable or part-way damaged video raises OSError or ValueError."""
    path, user_turns, rounds, start = plan
    offline = args.kind == "offline"
    first, _, seconds = check_video(path, ex["record"]["interval"] if offline else args.interval)
    # gold this video cannot reach (reward.gold_warnings): said, counted, and run as defined
    warnings = reward.gold_warnings(ex, seconds, args.interval * args.frames_per_turn) \
        if args.kind == "proactivevideoqa" else benchmarks.sb_warnings(ex, seconds) if not offline else []
    for warning in warnings:
        tqdm.write(f"gold warning, {ex['question_id']}: {warning}")
    if warnings:
        warned.add(ex["question_id"])
    h, w = first.shape[:2]
    size = f"{w}x{h} -> {mmduet2.frame_tokens(h, w, args.frame_tokens)} tokens/frame"
    sizes[size] = sizes.get(size, 0) + 1
    if offline:  # Table 4's protocol: the whole video in one user turn, the dialogue's own (default) system prompt
        _, frames = mmduet2.load_dialogue(ex["record"], args.videos)
        stream = engine.Stream(model, processor, system=ex["system"] or mmduet2.DEFAULT_SYSTEM_PROMPT)
        tic = time.perf_counter()
        reply = stream.turn(frames, ex["question"], **decode)  # one answer, greedy; NO REPLY is kept: a wrong one
        t = round(user_turns[0][0], 6)
        return ([{"role": "user", "content": ex["question"], "time": t},
                 {"role": "assistant", "content": reply.text.strip(), "time": t}], [time.perf_counter() - tic])
    # frames to the end of the last gold span (StreamingBench: to gt + 4 s), or to the video's end if it comes first
    n_turns = math.ceil(min(rounds, mmduet2.count_frames(seconds - start, args.interval)) / args.frames_per_turn)
    video = live.Feed(itertools.islice(mmduet2.read_frames(path, args.interval, start), rounds), args.interval,
                 args.frames_per_turn) if args.realtime else path  # --realtime: played as live
    with tqdm(total=n_turns, desc=size, unit="turn", leave=False) as turns:
        stream = engine.Stream(model, processor)
        if args.context_frames:  # only when asked: the benchmark's protocol keeps every frame
            stream = engine.Window(stream, args.context_frames)
        return stream_video(stream, video, args.interval, args.frames_per_turn,
                            user_turns, rounds, on_turn=lambda *turn: turns.update(), start=start, **decode)


def benchmark(args, model, processor, decode, plans, examples, done, skipped):
    """Run the examples not yet in --out (a resume), one flushed record each; skip and record a bad video."""
    sidecar, settings = args.out + ".run.json", run_settings(args)
    # todo: the examples not yet written, but those an earlier run skipped (unless --retry-skipped)
    todo = [qid for qid in plans if qid not in done and (args.retry_skipped or qid not in skipped)]
    held = [qid for qid in plans if qid not in done and qid not in todo]  # skipped by an earlier run
    again = f", {len(held)} skipped by an earlier run (reasons in {sidecar}; --retry-skipped runs them)" if held else ""
    print(f"{len(plans)} examples: {len(done)} already in {args.out}{again}, {len(todo)} to run")
    if args.overwrite or not os.path.exists(args.out):  # a new file: its settings are recorded first
        open(args.out, "w").close()
    sizes, warned, n_replies, latencies, n_new, n_skipped = {}, set(), 0, [], 0, 0
    bar = tqdm(todo, desc="examples", unit="video")
    qid = None
    try:
        record_run(sidecar, settings, skipped)
        for qid in bar:
            try:  # a missing, unreadable or part-way damaged video is skipped and recorded, never fatal
                responses, lat = stream_example(args, model, processor, decode, examples[qid], plans[qid],
                                                sizes, warned)
            except (OSError, ValueError) as e:
                tqdm.write(f"skipped {qid}: {e}")
                skipped[qid] = str(e)
                n_skipped += 1
                record_run(sidecar, settings, skipped)  # at once: a rerun does not stream it again (--retry-skipped)
                continue
            # one whole line per finished example, or none: an interrupted run resumes cleanly
            append_record(args.out, json.dumps({"question_id": qid, "model_response_list": responses}) + "\n")
            n_new += 1
            if skipped.pop(qid, None) is not None:  # a retried example that ran this time
                record_run(sidecar, settings, skipped)
            n_replies += sum(r["role"] == "assistant" for r in responses)
            latencies += lat
    except OSError as e:  # a full disk: the record being written was cut back off, the file holds whole ones
        bar.close()
        raise SystemExit(f"infer.py: cannot write {e.filename or args.out} ({e.strerror}): {n_new} examples were "
                         "written in this run, as whole records; free some space and rerun the same command: "
                         "it resumes") from None
    except KeyboardInterrupt:
        bar.close()
        written = done_ids(args.out, set(plans))  # read back: a record may have landed just before the Ctrl-C
        lost = f"; {qid} was in progress, is not written, and runs on a rerun" if qid and qid not in written else ""
        print(f"\ninfer.py: interrupted: {len(written) - len(done)} examples written to {args.out} in this run "
              f"({len(written)} in all){lost}", file=sys.stderr)
        raise SystemExit(130)
    frames = "".join(f"; {size} ({n} video{'s' * (n > 1)})" for size, n in sizes.items())  # each size once
    warned_line = f", {len(warned)} with gold warnings (above)" if warned else ""
    print(f"done {n_new} examples, skipped {n_skipped}" + (f" (reasons in {sidecar})" if n_skipped else "")
          + f"{warned_line}, replies {n_replies} ({n_replies / max(n_new, 1):.1f} per example); per-turn latency "
          f"{latency_line(latencies)} over {len(latencies)} turns{frames}")
    if not done and not n_new:  # every example skipped (an --interval no video takes, say): not a result
        raise SystemExit(f"infer.py: no example has a prediction in {args.out}: each was skipped (reasons above "
                         f"and in {sidecar}); fix the cause and rerun with --retry-skipped, or --overwrite")
    return {"done": n_new, "skipped": [q for q in todo if q in skipped], "replies": n_replies, "latencies": latencies,
            "gold_warnings": len(warned)}


# ----------------------------------------------------------------------------
# The demo, and main: check every input, load the model once, then watch or run the benchmark

ROOT = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(ROOT, "toy-model")  # a toy GRPO checkpoint shipped in the repository, for --demo


def demo_args(seed, out_dir):
    """A fresh toy video from `data.py toy` (a subprocess: scripts never import each other), then
    its question, video and gold events as the arguments of a normal run with the toy settings."""
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "toy", "--out", out_dir, "--seed", str(seed),
           "--n-train", "0", "--n-rl", "0", "--n-test", "1", "--nqna-frac", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    ex = json.load(open(os.path.join(out_dir, "test", "anno.json")))[0]
    print(f"a {ex['duration']:g} s toy video (data.py toy --seed {seed}), question: {ex['conversation'][0]['content']!r}")
    for a in ex["answer"]:
        s0, s1 = a["related_timespan"]
        print(f"  gold [{clock(s0)}-{clock(s1)}] {a['content']}")
    # the toy world's frame settings (2 s, 2 frames per turn: SFT and GRPO were trained on them)
    return ["--model", TOY_MODEL, "--question", ex["conversation"][0]["content"], "--interval", "2",
            "--frames-per-turn", "2", "--max-new-tokens", "16", os.path.join(out_dir, "test", "videos", ex["video"])]


def run_demo(seed, html=None):
    """--demo: a normal run on the arguments demo_args makes up; with --html, the page evaluate.py --html
    writes (the replies against the gold events, scored offline), for this one video."""
    with tempfile.TemporaryDirectory(prefix="mmduet2-demo-") as tmp:
        preds = os.path.join(tmp, "pred.jsonl")
        result = main(demo_args(seed, tmp) + ["--out", preds])
        if html:
            import evaluate  # here, not on top: only this page needs the evaluation script (and openai)
            gold = reward.load_gold(os.path.join(tmp, "test", "anno.json"))
            summary, marks = evaluate.evaluate(gold, preds, reward.OfflineJudge())
            evaluate.write_html(html, f"infer.py --demo {seed}", gold, [("toy-model", "infer.py --demo", summary, marks)])
            print(f"timeline page: {html}")
        return result


def main(argv=None):
    """A demo, one video or live source (watch), or a benchmark: every input checked, then the model loaded once."""
    args = parse_args(argv)  # bad flags stop here
    if args.demo is not None:
        return run_demo(args.demo, args.html)
    try:  # every bad input is a one-line error, checked before the (slow) model load
        if args.out:
            check_out(args.out, [args.video, args.benchmark])
            runs.hold_output(args.out)  # a second run on it is refused (its sidecar goes with it)
        if args.video:
            first, n_frames, user_turns = check_source(args)
            page = open_page(args.serve) if args.serve else None  # its socket: a port in use fails now
        else:
            plan = check_benchmark(args)  # (plans, examples, done, skipped)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model, processor = mmduet2.load_model(args.model, dtype, args.device, args.attn, args.frame_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: {e}") from None
    size = f" (this video: {first.shape[1]}x{first.shape[0]} -> " \
           f"{mmduet2.frame_tokens(*first.shape[:2], args.frame_tokens)} tokens)" if args.video else ""
    print(f"model {args.model} on {model.device}: a frame every {args.interval:g} s, {args.frames_per_turn} per turn, "
          f"<= {args.frame_tokens} LLM tokens per frame{size}; greedy, <= {args.max_new_tokens} new tokens per turn")
    decode = dict(config=engine.decoding(processor, max_new_tokens=args.max_new_tokens))  # greedy, as the paper
    if args.video:
        return watch(args, model, processor, decode, n_frames, user_turns, page)
    return benchmark(args, model, processor, decode, *plan)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before streaming began (the model load): nothing was written
        print("\ninfer.py: interrupted before anything was written", file=sys.stderr)
        sys.exit(130)
