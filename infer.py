"""Streaming inference: watch a video as a multi-turn chat and answer (or stay silent) every turn.

Role in the pipeline: the last stage (data -> SFT -> GRPO -> infer). It runs a checkpoint (the
released `wangyueqian/MMDuet2` by default) on a video file the way the paper does (Sec. 4.1 and
Appendix A): every user turn brings 1-2 frames, plus any text that arrived meanwhile (a question,
a subtitle); the model answers each turn with a reply or exactly "NO REPLY". The KV-cached engine
lives in mmduet2.py (`Stream`); this file reads frames, places user text, times each turn, prints
replies as they come and writes predictions in the ProactiveVideoQA format (paper Sec. 5.1).

Inference settings (paper-settings.md): 1 s frame interval, 1 frame per turn ([WEB]; the paper
uses 2 for [EGO], [TV], [VAD]: --frames-per-turn 2), greedy decoding, at most 100 new tokens per
turn, 128 LLM tokens per frame. Where we depart from the paper / released code:
1. Frame size is capped at 128 tokens (max_pixels = 128*28*28, the training setting); the
   released inference set no cap. `--frame-tokens` changes it (we offer no `--max-pixels`).
2. A user text that arrives between two turns is put into the first turn whose time is >= its
   time (the question at t=0 goes into the first turn, after that turn's frames).

Run:
    python infer.py --demo                   # offline: a new toy video through the shipped toy model (toy-model/)
    python infer.py video.mp4 --question "What is the person cooking?"           # released model
    python infer.py video.mp4 --model tiny --ask 5:"What now?" --out pred.jsonl   # CPU smoke run
    python infer.py --benchmark WEB/anno.json --videos WEB/videos --out preds.jsonl
    python infer.py --benchmark EGO/anno.json --videos EGO/videos --frames-per-turn 2 --out preds.jsonl
    python reward.py eval --gold WEB/anno.json --pred preds.jsonl --judge openai
"""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

import mmduet2
import reward


def clock(t):
    """Video time as [mm:ss] (with a decimal for sub-second intervals): 7.0 -> 00:07, 62.5 -> 01:02.5."""
    m, s = divmod(t, 60)
    return f"{int(m):02d}:{s:02.0f}" if s == int(s) else f"{int(m):02d}:{s:04.1f}"


def video_turns(video, interval, frames_per_turn=1, rounds=None):
    """Yield (t, frames) for each user turn, reading frames lazily (never the whole video).

    A turn holds `frames_per_turn` frames; the last may hold fewer. t = frames fed so far x interval,
    taken at the end of the turn's frames (Sec. 4.1). rounds caps the number of FRAMES streamed.
        7 frames, 1 s, 2 per turn -> (2, [f0, f1]), (4, [f2, f3]), (6, [f4, f5]), (7, [f6])
    """
    n, frames = 0, []
    for _, frame in itertools.islice(mmduet2.read_frames(video, interval), rounds):
        n += 1
        frames.append(frame)
        if len(frames) == frames_per_turn:
            yield n * interval, frames
            frames = []
    if frames:
        yield n * interval, frames


def stream_video(stream, video, interval=1.0, frames_per_turn=1, user_turns=(), rounds=None,
                 realtime=False, on_reply=None, keep_silent=False, **decode):
    """Stream `video` through an `mmduet2.Stream`, one user turn at a time. Returns (responses, latencies).

    user_turns: [(time, text)]; each text joins the first user turn whose time >= its time, after
    that turn's frames (texts meeting in one turn are joined by newlines; texts later than the
    last turn are never seen). rounds: frames to stream (None: the whole video). realtime: wait
    until each turn's frames would have arrived at wall-clock speed. on_reply(t, text) is called
    on each non-silent reply as soon as it exists. decode: options of `Stream.turn`.
    responses: the benchmark's `model_response_list`: the user turns that carry text and the
    replies (NO REPLY turns too when keep_silent), each {"role", "content", "time"}.
    latencies: seconds of model time per user turn (frame decoding and waiting excluded).
        5 frames, 1 s, 2 per turn, user_turns [(0, "Q?")] -> turns at t = 2, 4, 5; "Q?" joins t = 2
    """
    pending = sorted(user_turns, key=lambda u: u[0])  # texts the model has not seen yet
    responses, latencies, start = [], [], time.perf_counter()
    for t, frames in video_turns(video, interval, frames_per_turn, rounds):
        texts = []
        while pending and pending[0][0] <= t + 1e-9:  # the epsilon absorbs float error (3 x 0.1 s)
            texts.append(pending.pop(0)[1])
        text = "\n".join(texts) or None
        if realtime:  # the turn's last frame "arrives" at video time t
            time.sleep(max(0.0, t - (time.perf_counter() - start)))
        tic = time.perf_counter()
        reply = stream.turn(frames, text, **decode)  # 1-2 frames (+ text) in, a reply or NO REPLY out
        latencies.append(time.perf_counter() - tic)
        if text:
            responses.append({"role": "user", "content": text, "time": round(t, 6)})
        if not reply.silent or keep_silent:
            responses.append({"role": "assistant", "content": reply.text.strip(), "time": round(t, 6)})
        if on_reply and not reply.silent:
            on_reply(t, reply.text.strip())
    return responses, latencies


def check_video(path, interval):
    """Fail early (before a 3B model loads) on a missing, corrupt or too-short video: (first frame, last turn time)."""
    _, first = next(mmduet2.read_frames(path, interval))  # raises the one-line errors of mmduet2
    n_frames = mmduet2.count_frames(mmduet2.video_duration(path), interval)  # read_frames' own count
    return first, n_frames * interval


def parse_asks(specs, end):
    """--ask SECONDS:TEXT -> [(seconds, text)]; malformed or later than the last turn (`end`) is an error."""
    asks = []
    for spec in specs:
        seconds, sep, text = spec.partition(":")
        try:
            t = float(seconds)
        except ValueError:
            t = -1.0
        if not sep or not text.strip() or not math.isfinite(t) or t < 0:
            raise ValueError(f"--ask {spec!r} is not SECONDS:TEXT (e.g. --ask '12:What is he holding?')")
        if t > end:
            raise ValueError(f"--ask {spec!r}: {t:g} s is past the end of the video (last turn at {end:g} s)")
        asks.append((t, text.strip()))
    return asks


def done_ids(path):
    """question_ids already in a prediction JSONL (a benchmark run resumes after them)."""
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    ids.add(json.loads(line)["question_id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path} line {n} is not a prediction record (an interrupted write?): "
                                     "delete that line and rerun") from None
    return ids


def latency_line(latencies):
    """Mean and 95th percentile of per-turn model time, in ms."""
    if not latencies:
        return "n/a"
    ms = sorted(1000 * x for x in latencies)
    p95 = ms[max(0, math.ceil(0.95 * len(ms)) - 1)]  # nearest-rank percentile
    return f"mean {sum(ms) / len(ms):.0f} ms, p95 {p95:.0f} ms"


def parse_args(argv):
    p = argparse.ArgumentParser(description="Stream a video (or a ProactiveVideoQA benchmark) through MMDuet2.")
    # what to watch
    p.add_argument("video", nargs="?", help="video file to stream (or use --benchmark)")
    p.add_argument("--question", help="question asked at t=0, in the first user turn (after its frames)")
    p.add_argument("--ask", action="append", default=[], metavar="SECONDS:TEXT",
                   help="text put into the first user turn whose time >= SECONDS; repeatable")
    p.add_argument("--benchmark", metavar="ANNO_JSON", help="ProactiveVideoQA anno.json: run the benchmark protocol")
    p.add_argument("--videos", metavar="DIR", help="folder of the benchmark's videos (default: videos/ beside ANNO_JSON)")
    p.add_argument("--demo", type=int, nargs="?", const=0, metavar="SEED",
                   help="write a toy video (data.py toy, seed SEED) and stream it through the shipped toy model")
    p.add_argument("--out", help="prediction JSONL; single video: overwritten; benchmark: appended, resumable")
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
    p.add_argument("--no-fast-silence", action="store_true",
                   help="decode NO REPLY token by token instead of checking it in the turn's forward (same output)")
    p.add_argument("--realtime", action="store_true", help="feed frames at wall-clock speed, as a live stream")
    return p.parse_args(argv)


ROOT = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(ROOT, "toy-model")  # the GRPO toy checkpoint shipped in the repository (README, results)


def demo(seed, out_dir):
    """--demo: a fresh toy video from `data.py toy` (a subprocess: scripts never import each other), then
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


def main(argv=None):
    args = parse_args(argv)
    if args.demo is not None:
        with tempfile.TemporaryDirectory(prefix="mmduet2-demo-") as tmp:
            return main(demo(args.demo, tmp))
    if (args.video is None) == (args.benchmark is None):
        raise SystemExit("infer.py: give either a VIDEO or --benchmark ANNO_JSON")
    if args.benchmark:
        args.videos = args.videos or os.path.join(os.path.dirname(args.benchmark), "videos")
        if not args.out:
            raise SystemExit("infer.py: --benchmark needs --out FILE.jsonl")
        if not os.path.isdir(args.videos):
            raise SystemExit(f"infer.py: videos folder not found: {args.videos} (give --videos DIR)")
    if args.benchmark and (args.question or args.ask):
        raise SystemExit("infer.py: --question/--ask are for a single VIDEO; a benchmark brings its own questions")
    if args.interval <= 0 or args.frame_tokens < 4 or args.max_new_tokens < 1:
        raise SystemExit("infer.py: --interval must be > 0, --frame-tokens >= 4, --max-new-tokens >= 1")
    try:  # every bad input is a one-line error, checked before the (slow) model load
        if args.video:
            first, end = check_video(args.video, args.interval)
            user_turns = ([(0.0, args.question)] if args.question else []) + parse_asks(args.ask, end)
        else:
            reward.load_gold(args.benchmark)  # first: it checks durations and spans (the rounds formula needs them)
            examples = mmduet2.load_anno(args.benchmark)  # ... and this that every example names its video
            done = done_ids(args.out)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model, processor = mmduet2.load_model(args.model, dtype, args.device, args.attn, args.frame_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"infer.py: {e}") from None
    size = f" (this video: {first.shape[1]}x{first.shape[0]} -> " \
           f"{mmduet2.frame_tokens(*first.shape[:2], args.frame_tokens)} tokens)" if args.video else ""
    print(f"model {args.model} on {model.device}: a frame every {args.interval:g} s, {args.frames_per_turn} per turn, "
          f"<= {args.frame_tokens} LLM tokens per frame{size}; greedy, <= {args.max_new_tokens} new tokens per turn")
    decode = dict(config=mmduet2.decoding(processor, max_new_tokens=args.max_new_tokens),  # greedy, as the paper
                  fast_silence=not args.no_fast_silence)

    if args.video:  # ---- one video: print replies as they come
        def show(t, text):
            print(f"[{clock(t)}] {text or '(a blank reply)'}", flush=True)
        stream = mmduet2.Stream(model, processor)  # one conversation (and KV cache) per video
        responses, latencies = stream_video(stream, args.video, args.interval, args.frames_per_turn, user_turns,
                                            realtime=args.realtime, on_reply=show, **decode)
        n_replies = sum(r["role"] == "assistant" for r in responses)
        if args.out:
            qid = os.path.splitext(os.path.basename(args.video))[0]
            with open(args.out, "w") as f:
                f.write(json.dumps({"question_id": qid, "model_response_list": responses}) + "\n")
        # real-time factor = model time / video time: below 1 the model keeps up with a live stream
        print(f"{len(latencies)} turns, {n_replies} replies; per-turn latency {latency_line(latencies)}; "
              f"real-time factor {sum(latencies) / end:.2f}")
        return {"turns": len(latencies), "replies": n_replies, "latencies": latencies}

    # ---- benchmark (Sec. 5.1): the question at t=0, subtitles at their times, frames to the last gold span
    todo = [ex for ex in examples if ex["question_id"] not in done]
    print(f"{len(examples)} examples: {len(examples) - len(todo)} already in {args.out}, {len(todo)} to run")
    skipped, n_replies, latencies = [], 0, []
    with open(args.out, "a") as f:
        for ex in tqdm(todo, desc="examples", unit="video"):
            path = os.path.join(args.videos, ex["video"])
            try:
                check_video(path, args.interval)
            except (OSError, ValueError) as e:  # a missing or unreadable video is reported, never fatal
                tqdm.write(f"skipped {ex['question_id']}: {e}")
                skipped.append(ex["question_id"])
                continue
            user_turns = [(float(c.get("time") or 0), c["content"])  # conversation[0] is the question at t=0
                          for c in ex["conversation"] if c.get("role", "user") == "user"]
            rounds = reward.stream_rounds(ex, 1 / args.interval)  # frames up to the end of the last gold span
            responses, lat = stream_video(mmduet2.Stream(model, processor), path, args.interval, args.frames_per_turn,
                                          user_turns, rounds, args.realtime, **decode)
            f.write(json.dumps({"question_id": ex["question_id"], "model_response_list": responses}) + "\n")
            f.flush()  # one whole line per finished example: an interrupted run resumes cleanly
            n_replies += sum(r["role"] == "assistant" for r in responses)
            latencies += lat
    n_done = len(todo) - len(skipped)
    print(f"done {n_done} examples, skipped {len(skipped)}, replies {n_replies} "
          f"({n_replies / max(n_done, 1):.1f} per example); per-turn latency {latency_line(latencies)} "
          f"over {len(latencies)} turns")
    return {"done": n_done, "skipped": skipped, "replies": n_replies, "latencies": latencies}


if __name__ == "__main__":
    main()
