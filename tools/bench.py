"""Performance: what a streamed turn, an SFT step and a GRPO step cost in time and memory, as JSON + Markdown.

A side tool of the pipeline (data → SFT → GRPO → infer): it checks on our own code the cost argument of
docs/streaming.md (a KV-cached engine.Stream encodes only the new turn; re-encoding the conversation costs
O(turns²) over a video) and what one GPU holds at full scale. How each command measures: docs/performance.md.

    python tools/bench.py stream --model tiny --threads 1          # CPU, ~20 s: cache vs re-encode, silent turns
    python tools/bench.py stream --model 3b --device cuda --frame-size 224 448     # random 3B, bf16, 128 tok/frame
    python tools/bench.py sft --model tiny --threads 1             # tokens/s and peak memory of one SFT step
    python tools/bench.py grpo --model tiny --steps 6 --threads 1  # runs grpo.py, reads its metrics.jsonl
    python tools/bench.py memory                   # per-GPU memory of SFT and GRPO at 3B under DDP, fake tensors (~30 s)
    python tools/bench.py gpu --out bench/gpu                      # on a GPU: its tests, 3B latency, SFT and GRPO steps
    python tools/bench.py live --model tiny --minutes 120 --threads 1 --out DIR  # 2 h of live stream, bounded vs not

Each writes OUT/NAME.json and OUT/NAME.md (--out, default bench/), naming the machine; targets are PASS/FAIL lines,
never asserted. On a busy CPU use --threads 1 (spin-waiting OpenMP threads made a 2-thread forward 30x slower).
`--model 3b`: Qwen2.5-VL-3B's architecture, random weights, the tiny tokenizer (a forward costs the same whatever
ids and weights). What one measurement alone varies is FIXED.
"""
import argparse
import gc
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: this file is tools/bench.py
sys.path.insert(0, ROOT)  # `python tools/bench.py` finds mmduet2.py and the others in the repository root
import engine  # noqa: E402
from tools import memory_probe  # noqa: E402
import mmduet2  # noqa: E402
import runs  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct's config.json. For the vision tower the file gives only hidden 1280,
# out 2048 and tokens_per_second 2; the other values are Qwen2_5_VLVisionConfig's defaults.
QWEN_3B_TEXT = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                    intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
QWEN_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
GIB = 2**30
CARD_GIB = 79.1  # an H100 80GB, as torch.cuda.get_device_properties(0).total_memory reports it
SAMPLE_TURNS = (1, 10, 20, 40, 60, 100, 150, 200)  # where the table reports, and re-encoding is timed
WINDOW = 5  # latency "at turn k" pools turns k-4..k (× repeats), so a p95 has samples to stand on
# Fixed, not flags (tests shrink them): every command's dtype (auto: bf16 on a GPU) and the paper's 128 tokens/frame
EVERY = dict(dtype="auto", frame_tokens=mmduet2.FRAME_TOKENS)
FIXED = dict(
    # timings per measurement (each on a fresh fork); re-encoding timed at the sampled turns <= 200 (it costs
    # turns²); 20 silent turns per mode after 10 streamed ones; a reply's cap, if the model does speak
    stream=dict(frames_per_turn=1, repeats=3, reencode_max=200, context=10, silent_turns=20, max_new_tokens=32,
                silence_steps=50),  # AdamW steps that teach the tiny and the random 3B model NO REPLY
    sft=dict(frames_per_turn=1, warmup=1, grad_checkpointing=True),  # 1 untimed step first; checkpointing as sft.py
    # grpo.py's G, lr and checkpointing; each rollout answers a 10 s segment (10 turns at 1 frame/s)
    grpo=dict(frames_per_turn=1, group=4, lr=1e-6, grad_checkpointing=True, segment=10.0, interval=1.0, max_new_tokens=16),
    # the paper's 2 frames per turn; the SFT tokens with a loss: 5-10% of a proactive dialogue (assumed); a GRPO
    # rollout: 90 frames (context + segment), 500 generated = supervised tokens (20 s at 2 s/frame: 5 turns × 100), G = 4
    memory=dict(frames_per_turn=2, supervised=0.1, rollout_frames=90, generated_tokens=500, group=4, card_gib=CARD_GIB),
    gpu=dict(frames_per_turn=2),
    # the paper's live settings (--frame-size 224 448 by default) and infer.py's window of 90 frames; replies cut at
    # 16 tokens (the random tiny model speaks every turn), a question every 5 stream-minutes: docs/live.md says why
    live=dict(frames_per_turn=2, interval=2.0, context_frames=90, max_new_tokens=16, question_every_s=300,
              reference_minutes=(10, 20), last_minutes=10, unbounded_minutes=30))

# ----------------------------------------------------------------------------
# Setup: the model, the machine, clocks, frames, the report


def qwen_3b_config(processor, layers=0):
    """Qwen2.5-VL-3B's architecture, wired to the tiny tokenizer's special-token ids (the ids we feed)."""
    from transformers import Qwen2_5_VLConfig
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in mmduet2.SPECIAL_TOKENS}
    text, vision = dict(QWEN_3B_TEXT), dict(QWEN_3B_VISION)
    if layers:  # full widths, fewer blocks: the same code path, cheap enough for a CPU
        text["num_hidden_layers"] = vision["depth"] = layers
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1]
    special = dict(bos_token_id=ids[mmduet2.ENDOFTEXT], eos_token_id=ids[mmduet2.IM_END],
                   pad_token_id=ids[mmduet2.ENDOFTEXT])
    return Qwen2_5_VLConfig(text_config=dict(text, **special), vision_config=vision, **special,
                            image_token_id=ids[mmduet2.IMAGE_PAD], video_token_id=ids[mmduet2.VIDEO_PAD],
                            vision_start_token_id=ids[mmduet2.VISION_START], vision_end_token_id=ids[mmduet2.VISION_END])


def setup(args, weights_dtype=None):
    """Device and compute dtype (into args); then (model, processor, machine description)."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.compute = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    dtype = weights_dtype or args.compute
    torch.manual_seed(0)
    if args.model != "3b":
        model, processor = mmduet2.load_model(args.model, dtype=dtype, device=args.device, frame_tokens=args.frame_tokens)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        _, processor = mmduet2.tiny_model()  # tokenizer + image processor (14-px patches, 2×2 merge, as the 3B)
        mmduet2.set_frame_tokens(processor, args.frame_tokens)
        with torch.device(args.device):  # built where it runs, in its dtype: no 15 GB fp32 detour on the host
            model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_3b_config(processor, args.layers), dtype=dtype).eval()
    return model, processor, machine(args, model.num_parameters())


def machine(args, params=None):
    """What the numbers were measured on: CPU model, threads, versions, device, dtype, model."""
    import transformers
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, device=str(args.device),
                gpu=torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
                dtype=str(args.compute).replace("torch.", ""), model=args.model, params_m=params and round(params / 1e6, 2))


def cold_fork(stream):
    """A fork of the stream that runs the vision encoder itself, as a live stream sees each frame once."""
    fork = stream.fork()
    fork.vision = {}
    return fork


def clock(device):
    """Seconds; on CUDA wait for the queued kernels first, or we would time their launch, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def ms(seconds, q=50):
    return round(1000 * float(np.percentile(seconds, q)), 3)


def frame_pool(args, n=16):
    """n random frames of --frame-size; turn k gets the next frames_per_turn of them, cyclically."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (*args.frame_size, 3), dtype=np.uint8) for _ in range(n)]
    fpt = args.frames_per_turn
    return lambda k: [pool[(k * fpt + i) % n] for i in range(fpt)]


def silent_dialogue(n_turns, frames_of, fpt, reply=None):
    """(messages, frames) of a dialogue whose every assistant turn is NO REPLY (with `reply`: every other one)."""
    messages = [{"role": r, "content": c} for k in range(n_turns)
                for r, c in (("user", mmduet2.IMAGE * fpt), ("assistant", reply if reply and k % 2 else mmduet2.SILENCE))]
    return messages, [f for k in range(n_turns) for f in frames_of(k)]


def md_table(header, rows):
    """Markdown table lines; floats (milliseconds) with one decimal."""
    cell = lambda x: f"{x:,.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]


def report(args, name, result, lines):
    """Write OUT/name.json and OUT/name.md and print the Markdown; the targets as PASS/FAIL lines, never asserted."""
    m = result["machine"]
    head = [f"## bench.py {name}: {m['model']} on {m['gpu'] or m['cpu']} ({m['device']}, {m['dtype']}, "
            f"{m['threads']} threads, torch {m['torch']})", ""]
    if "targets" in result:  # pass: None when it could not be measured
        lines = lines + [""] + [f"- {'N/A' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'}: {t['text']} "
                                f"(measured {t['value']}{'; ' + t['note'] if t.get('note') else ''})"
                                for t in result["targets"].values()]
    if not m["gpu"]:
        result["gpu_pending"] = "This run had no GPU: for the GPU's numbers (3B, bf16), `bench.py gpu` on one."
        lines = lines + ["", result["gpu_pending"]]
    text = "\n".join(head + lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    json.dump(result, open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)
    open(os.path.join(args.out, f"{name}.md"), "w").write(text)
    print(text)
    return result


# ----------------------------------------------------------------------------
# stream: per-turn latency with the cache and re-encoding; silent turns; real-time factor


def teach_silence(model, processor, frames_of, fpt, steps, n_turns=8, reply=None):
    """`steps` of AdamW on an all-NO-REPLY dialogue of `n_turns` turns of `fpt` frames, so that greedy turns come out
    silent. Only the last decoder layer and the final norm learn: enough to say NO REPLY, and affordable at 3B (no
    optimizer state for 3B parameters; a random model's bf16 weights are stepped as they are: it is taught, not
    trained for a result). lr 1e-3: silent within 10 steps at both widths we tried (128 and 2048); 1e-2 oscillated
    at 2048.
    Timing does not depend on what the weights are, but a silent turn must be silent: taught on 8 two-frame turns,
    the random 3B model on an H100 stayed silent after 10 one-frame turns and not after 10 two-frame ones (longer
    than what it was taught on), so the gpu check teaches on a dialogue as long as the longest stream it times.
    With `reply`, every other turn says it: the model learns to say it or NO REPLY about half the time."""
    lm = model.model.language_model
    params = list(lm.layers[-1].parameters()) + list(lm.norm.parameters())
    model.requires_grad_(False)  # no gradients for the rest: at full 3B depth they would not fit in 24 GiB
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    seq = mmduet2.encode_dialogue(processor, *silent_dialogue(n_turns, frames_of, fpt, reply))
    model.train()
    for _ in range(steps):
        loss = -mmduet2.forward_logprobs(model, seq).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return round(loss.item(), 4)


def bench_stream(args):
    model, processor, info = setup(args)
    dev, fpt, (h, w) = args.device, args.frames_per_turn, args.frame_size
    frames_of = frame_pool(args)
    tpf = mmduet2.frame_tokens(h, w, args.frame_tokens)

    def reencode(seq):  # the whole conversation again, keeping only the last logits (as a prefill does)
        t0 = clock(dev)
        with torch.no_grad():
            model(**mmduet2.model_inputs(model, seq), use_cache=False, logits_to_keep=1)
        return clock(dev) - t0

    def teacher_forced(s, k):  # user turn k + its NO REPLY → (seconds encoding them, seconds prefilling them)
        t0 = clock(dev)
        s.feed(None, frames_of(k))
        s.feed(mmduet2.SILENCE, role="assistant")
        t1 = clock(dev)
        s.prefill()
        return t1 - t0, clock(dev) - t1

    warm = engine.Stream(model, processor)  # warm-up: allocator, kernel choice, the processor's first call
    for k in range(3):
        teacher_forced(warm, k)
    reencode(warm.seq)

    # 1. Turn k with the cache (each repeat on a fresh fork: same turn, same cache) vs re-encoding
    sample = sorted({k for k in SAMPLE_TURNS if k <= args.turns} | {args.turns})
    stream = engine.Stream(model, processor)
    stream.prefill()  # the system prompt
    enc, pre, ctx, full = {}, {}, {}, {}
    for k in range(1, args.turns + 1):
        forks = [cold_fork(stream) for _ in range(args.repeats)]
        enc[k], pre[k] = zip(*[teacher_forced(s, k) for s in forks])
        stream, ctx[k] = forks[-1], len(forks[-1].seq.ids)  # the last fork carries on
        if k in sample and k <= args.reencode_max:
            full[k] = ms([reencode(stream.seq) for _ in range(args.repeats)])
    near = lambda d, k: [x for j in range(max(1, k - WINDOW + 1), k + 1) for x in d[j]]  # noqa: E731
    rows = []
    for k in sample:
        total = [e + p for e, p in zip(near(enc, k), near(pre, k))]
        rows.append(dict(turn=k, context_tokens=ctx[k], cached_p50_ms=ms(near(pre, k)), cached_p95_ms=ms(near(pre, k), 95),
                         encode_p50_ms=ms(near(enc, k)), latency_p50_ms=ms(total), latency_p95_ms=ms(total, 95),
                         reencode_ms=full.get(k)))
    at = {r["turn"]: r for r in rows}

    # 2. Silent turns: one user turn three ways, each on a fork of the same stream
    loss = teach_silence(model, processor, frames_of, fpt, args.silence_steps) if args.silence_steps else None
    base = engine.Stream(model, processor)
    for k in range(args.context):  # the context: turns answered NO REPLY
        teacher_forced(base, k)
    times, replies = {"fast": [], "slow": [], "bare": []}, {"fast": [], "slow": []}
    config = engine.decoding(processor, max_new_tokens=args.max_new_tokens)
    for i in range(args.silent_turns + 1):  # i = 0 is a warm-up, not counted: [1:] below
        frames, forks = frames_of(args.context + i), {m: cold_fork(base) for m in times}
        for mode, s in forks.items():
            t0 = clock(dev)
            if mode == "bare":  # the floor: encode and prefill the user turn, decide nothing
                s.feed(None, frames)
                s.prefill()
            else:
                replies[mode].append(s.turn(frames, config=config, fast_silence=mode == "fast"))
            times[mode].append(clock(dev) - t0)
    sil = dict(context_turns=args.context, turns=args.silent_turns, train_steps=args.silence_steps, train_loss=loss,
               **{f"{m}_p50_ms": ms(t[1:]) for m, t in times.items()},
               **{f"{m}_p95_ms": ms(t[1:], 95) for m, t in times.items()},
               **{f"silent_fraction_{m}": float(np.mean([r.silent for r in v[1:]])) for m, v in replies.items()})

    # 3. Real time at 1 frame/s: a turn of fpt frames arrives every fpt seconds
    last = at[args.turns]
    rtf = dict(seconds_per_turn=float(fpt), cached_p50=last["latency_p50_ms"] / 1000 / fpt,
               cached_p95=last["latency_p95_ms"] / 1000 / fpt, silent_fast_p50=sil["fast_p50_ms"] / 1000 / fpt)

    # Targets, reported not asserted: flat cached work, re-encoding ≥ 10× by turn 60, cheap silence
    ref = 10 if args.turns >= 10 else 1
    k60 = max((k for k in full if k <= 60), default=None)
    flat = last["cached_p50_ms"] / at[ref]["cached_p50_ms"]
    slower = full[k60] / at[k60]["cached_p50_ms"] if k60 else None
    fast = sil["fast_p50_ms"] / sil["bare_p50_ms"]
    targets = dict(
        cache_flat={"text": f"cached turn {args.turns} <= 1.5x cached turn {ref}", "value": round(flat, 2),
                    "pass": flat <= 1.5},
        reencode_10x={"text": f"re-encoding >= 10x cached, at turn {k60}", "value": slower and round(slower, 1),
                      "pass": None if k60 is None else slower >= 10},
        fast_silence={"text": "silent turn with fast silence <= 1.3x bare prefill", "value": round(fast, 2),
                      "pass": fast <= 1.3, "note": None if sil["silent_fraction_fast"] > 0.5 else "the model was not silent"})
    result = dict(command="stream", machine=info, targets=targets, silent=sil, realtime_factor=rtf, turns=rows,
                  config=dict(turns=args.turns, repeats=args.repeats, frame_size=[h, w], tokens_per_frame=tpf,
                              frame_tokens_cap=args.frame_tokens, frames_per_turn=fpt, reencode_max=args.reencode_max),
                  cached_prefill_ms_per_turn=[ms(pre[k]) for k in range(1, args.turns + 1)])

    lines = [f"{tpf} tokens per frame ({h}×{w}), {fpt} frame(s) per turn. Milliseconds; p50/p95 over turns k-4..k "
             f"× {args.repeats} repeats. cached = the model's prefill of the new turn; encode = the processor "
             "(template, resize, tokenize), the same cost on both routes.", ""]
    lines += md_table(["turn", "context tokens", "cached p50", "cached p95", "encode p50", "re-encode", "re-encode / cached"],
                      [[r["turn"], f"{r['context_tokens']:,}", r["cached_p50_ms"], r["cached_p95_ms"], r["encode_p50_ms"],
                        r["reencode_ms"] or "-", f"{r['reencode_ms'] / r['cached_p50_ms']:.1f}x" if r["reencode_ms"] else "-"]
                       for r in rows])
    lines += [""] + md_table([f"one turn after {args.context} (x{args.silent_turns})", "p50", "p95", "silent"],
                             [[label, sil[f"{m}_p50_ms"], sil[f"{m}_p95_ms"],
                               f"{sil[f'silent_fraction_{m}']:.0%}" if m in replies else "-"]
                              for m, label in (("fast", "turn(), fast silence"), ("slow", "turn(), plain decoding"),
                                               ("bare", "bare prefill of the user turn"))])
    lines += ["", f"Real-time factor at 1 frame/s, turn {args.turns}: {rtf['cached_p50']:.3f} (p50), "
              f"{rtf['cached_p95']:.3f} (p95); a silent turn: {rtf['silent_fast_p50']:.3f}."]
    return report(args, "stream", result, lines)


# ----------------------------------------------------------------------------
# live: hours of a stream with no end, with the bounded context (engine.Window) and without


def rss_mb():
    """Resident memory of this process now, in MiB (psutil, which accelerate brings), after a garbage collection."""
    import psutil
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def soak(model, processor, args, context_frames, minutes):
    """Stream `minutes` of a synthetic endless source at args' settings as fast as the model goes (no sleeping), new
    random frames every turn (a live source never repeats one, so no vision feature is reused); the run's numbers."""
    fpt, turn_s = args.frames_per_turn, args.interval * args.frames_per_turn
    rng = np.random.default_rng(0)
    stream = engine.Stream(model, processor)
    window = engine.Window(stream, context_frames) if context_frames else None
    config = engine.decoding(processor, max_new_tokens=args.max_new_tokens)
    every = max(1, round(args.question_every_s / turn_s))  # turns between questions
    question = "Tell me whenever something new appears, and what it is."
    latency, context, rss, max_pos, n_turns = [], [], {}, 0, int(minutes * 60 / turn_s)
    t0 = time.perf_counter()
    for k in range(1, n_turns + 1):
        t = k * turn_s  # the turn's stream time: its frames have been seen
        frames = [rng.integers(0, 255, (*args.frame_size, 3), dtype=np.uint8) for _ in range(fpt)]
        text = question if (k - 1) % every == 0 else None
        tic = clock(args.device)
        if window:
            window.turn(frames, text, config, t=t)
        else:
            stream.turn(frames, text, config)
        latency.append(clock(args.device) - tic)
        s = window.stream if window else stream
        context.append(len(s.seq.ids))  # every token the model attends to after this turn (its cache + 2 pending)
        max_pos = max(max_pos, s.pos)
        if t >= args.reference_minutes[0] * 60 and "start" not in rss:
            rss["start"] = rss_mb()
    rss["end"] = rss_mb()
    times = np.arange(1, n_turns + 1) * turn_s

    def p50(a, b):  # p50 latency (ms) over the turns with a < t <= b stream-seconds
        x = [lat for lat, t in zip(latency, times) if a < t <= b]
        return ms(x) if x else None
    ref = p50(args.reference_minutes[0] * 60, args.reference_minutes[1] * 60)
    last = p50(times[-1] - args.last_minutes * 60, times[-1]) if n_turns else None
    # what the context may hold at most: system, the memory's turn, then context_frames // fpt turns, each the
    # longest user turn (frames + the question) and the longest reply (max_new_tokens, a closing <|im_end|>, "\n")
    budget = None
    if window:
        user = len(mmduet2.encode_user(processor, question, frames).ids)
        memory = window.memory_tokens + len(mmduet2.encode_user(processor, "x", (), generation_prompt=False).ids) - 1
        budget = len(mmduet2.encode_system(processor).ids) + memory + context_frames // fpt * (user + args.max_new_tokens + 2)
    out = dict(minutes=minutes, context_frames=context_frames, turns=n_turns, wall_s=round(time.perf_counter() - t0, 1),
               max_context_tokens=max(context), context_budget_tokens=budget, max_rope_position=max_pos,
               latency_p50_ms_minutes_10_20=ref, latency_p50_ms_last_10=last,
               latency_ratio=round(last / ref, 3) if ref and last else None,
               rss_mb_minute_10=rss.get("start") and round(rss["start"], 1), rss_mb_end=round(rss["end"], 1),
               rss_growth_mb=round(rss["end"] - rss["start"], 1) if "start" in rss else None,
               context_tokens_every_minute=context[::max(1, round(60 / turn_s))],
               latency_p50_ms_every_minute=[ms(latency[i:i + round(60 / turn_s)]) for i in range(0, n_turns, round(60 / turn_s))])
    if window:
        out.update(rebuilds=window.rebuilds, rebuild_every_frames=window.step,
                   rebuild_p50_ms=ms(window.rebuild_s) if window.rebuild_s else None,
                   rebuild_max_ms=ms(window.rebuild_s, 100) if window.rebuild_s else None,
                   dropped_frames=window.dropped_frames, memory_questions=sum(r == "user" for _, r, _ in window.memory),
                   memory_replies=sum(r == "assistant" for _, r, _ in window.memory), memory_hidden=window.hidden)
    return out


def bench_live(args):
    """`--minutes` with infer.py's bounded context, then unbounded (at most unbounded_minutes); issue 27's targets."""
    model, processor, info = setup(args)
    tpf = mmduet2.frame_tokens(*args.frame_size, args.frame_tokens)
    runs_ = {"bounded": soak(model, processor, args, args.context_frames, args.minutes),
             "unbounded": soak(model, processor, args, 0, min(args.minutes, args.unbounded_minutes))}
    b = runs_["bounded"]
    at_most = lambda key, limit: {"value": b[key], "pass": None if b[key] is None else b[key] <= limit}  # noqa: E731
    targets = dict(
        context={"text": "max context tokens <= budget", **at_most("max_context_tokens", b["context_budget_tokens"])},
        latency={"text": "latency ratio (p50, last 10 stream-minutes / minutes 10-20) <= 1.2",
                 **at_most("latency_ratio", 1.2)},
        rss={"text": "RSS growth (end - minute 10) <= 100 MB", **at_most("rss_growth_mb", 100)})
    result = dict(command="live", machine=info, targets=targets, **{k: b[k] for k in (
                  "turns", "max_context_tokens", "context_budget_tokens", "latency_ratio", "rss_growth_mb")},
                  runs=runs_, config=dict(minutes=args.minutes, interval=args.interval, frames_per_turn=args.frames_per_turn,
                                          frame_size=list(args.frame_size), tokens_per_frame=tpf,
                                          context_frames=args.context_frames, max_new_tokens=args.max_new_tokens,
                                          question_every_s=args.question_every_s))
    keys = ("minutes", "turns", "wall_s", "max_context_tokens", "context_budget_tokens", "max_rope_position",
            "latency_p50_ms_minutes_10_20", "latency_p50_ms_last_10", "latency_ratio", "rss_mb_minute_10", "rss_mb_end",
            "rss_growth_mb", "rebuilds", "rebuild_p50_ms", "rebuild_max_ms")
    lines = [f"A synthetic endless source: {tpf} tokens per frame ({args.frame_size[0]}×{args.frame_size[1]}), a frame "
             f"every {args.interval:g} s, {args.frames_per_turn} per turn, replies cut at {args.max_new_tokens} tokens, "
             "streamed without sleeping.", ""]
    lines += md_table(["", "bounded (--context-frames %d)" % args.context_frames, "unbounded (0)"],
                      [[k, *(runs_[r].get(k) if runs_[r].get(k) is not None else "-" for r in runs_)] for k in keys])
    return report(args, "live", result, lines)


# ----------------------------------------------------------------------------
# sft: one training step (forward + backward + AdamW) on a synthetic dialogue


def bench_sft(args):
    model, processor, info = setup(args, weights_dtype=torch.float32)  # fp32 master weights, as sft.py
    dev, fpt, tpf = args.device, args.frames_per_turn, mmduet2.frame_tokens(*args.frame_size, args.frame_tokens)
    trained = runs.trainable(model, args.grad_checkpointing)  # as sft.py: the ViT frozen (not its merger), gradients
    model.train()
    n_turns = args.seq_len // (tpf * fpt) + 1  # more than enough; cut to --seq-len (never inside a frame)
    seq = mmduet2.encode_dialogue(processor, *silent_dialogue(n_turns, frame_pool(args), fpt), max_tokens=args.seq_len)
    opt = torch.optim.AdamW(trained, lr=1e-5, fused=dev.type == "cuda")  # sft.py's optimizer: fused on a GPU
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" and args.compute == torch.bfloat16 else nullcontext()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # weights and gradients stay allocated: the peak still counts them
    times = []
    for i in range(args.warmup + args.steps):
        t0 = clock(dev)
        with amp:
            loss = -mmduet2.forward_logprobs(model, seq).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated, as in DDP's buckets (bench.py memory's model)
        if i >= args.warmup:
            times.append(clock(dev) - t0)
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "torch.cuda.max_memory_allocated"
    else:  # Linux counts KiB; the whole process so far (model build included), not this step alone
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max RSS of the process (CPU)"
    step = float(np.median(times))
    result = dict(command="sft", machine=info, step_s=round(step, 4), tokens_per_s=round(len(seq.ids) / step, 1),
                  peak_memory_gib=round(peak, 3), memory_kind=kind,
                  config=dict(seq_len=len(seq.ids), supervised_tokens=sum(seq.mask), frames=len(seq.grids),
                              tokens_per_frame=tpf, grad_checkpointing=args.grad_checkpointing, steps=args.steps,
                              trained_params_m=round(sum(p.numel() for p in trained) / 1e6, 2)))
    lines = md_table(["tokens", "frames", "grad ckpt", "step s (p50)", "tokens/s", "peak memory"],
                     [[f"{len(seq.ids):,}", f"{len(seq.grids)} × {tpf} tok", args.grad_checkpointing, f"{step:.3f}",
                       f"{len(seq.ids) / step:,.0f}", f"{peak:.2f} GiB ({kind})"]])
    return report(args, "sft", result, lines)


# ----------------------------------------------------------------------------
# grpo: grpo.py itself on a small synthetic RL set, timed through its metrics.jsonl


def write_mp4(path, frames, fps):
    """(H, W, 3) uint8 RGB frames → an mp4: libx264 through PyAV, or MPEG-4 through OpenCV where PyAV is missing
    (the GPU machines' image has OpenCV and no PyAV). decord reads both."""
    h, w = frames[0].shape[:2]
    try:
        import av
    except ImportError:
        import cv2
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for frame in frames:
            out.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV wants BGR
        out.release()
        return str(path)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            for packet in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():  # flush the encoder's delayed frames
            out.mux(packet)
    return str(path)


def write_rl_set(folder, args, n_videos=2, fps=2):
    """n noise mp4s + an anno.json in the ProactiveVideoQA format, two gold events per video."""
    (h, w), seconds = args.frame_size, max(16, 2 * round(args.segment))
    os.makedirs(os.path.join(folder, "videos"))
    anno, rng = [], np.random.default_rng(0)
    for i in range(n_videos):
        write_mp4(os.path.join(folder, "videos", f"v{i}.mp4"),
                  [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(seconds * fps)], fps)
        events = [("A red square appeared on the left.", 0.2 * seconds), ("A blue square appeared on the top.", 0.6 * seconds)]
        anno.append({"video": f"v{i}.mp4", "question_id": f"q{i}", "duration": float(seconds),
                     "conversation": [{"role": "user", "content": "Tell me whenever a new shape appears.", "time": 0.0}],
                     "answer": [{"role": "assistant", "content": text, "related_timespan": [t, t + 3],
                                 "reply_timespan": [t, t + 4]} for text, t in events]})
    json.dump(anno, open(os.path.join(folder, "anno.json"), "w"))
    return os.path.join(folder, "anno.json")


def checkpoint_tensors(folder):
    """name → tensor, read lazily from a checkpoint folder's safetensors files (one, or the shards of its index)."""
    from safetensors import safe_open
    for name in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(name, "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def moved_fraction(init, final):
    """Share of the trained weights (all but the frozen ViT; its merger is trained) that differ between two
    checkpoint folders: what one update at a tiny lr moved (fp32 master weights: all of them)."""
    before = dict(checkpoint_tensors(init))
    moved = total = 0
    for key, after in checkpoint_tensors(final):
        if key.startswith("model.visual.") and ".merger." not in key:
            continue
        moved += int((before.pop(key).float() != after.float()).sum())
        total += after.numel()
    return moved / total


def bench_grpo(args):
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as work:
        init, anno = args.model, write_rl_set(work, args)
        if args.model in ("3b", "tiny"):  # a random model, saved as a folder for grpo.py (3B: bf16 weights)
            model, processor, _ = setup(args, weights_dtype=torch.bfloat16 if args.model == "3b" else None)
            # What the run writes: this folder (3B: 2 B per parameter) and grpo.py's fp32 `final` (4 B); no step-N.
            need, free = 6 * model.num_parameters() * 1.05, shutil.disk_usage(work).free
            if need > free:
                raise SystemExit(f"bench.py grpo: {need / 1e9:.0f} GB needed in {work}, {free / 1e9:.0f} GB free")
            # The random model speaks the tokenizer's ids only. With all 151,936 rows random it samples ids the tiny
            # tokenizer does not have, its replies decode to "", every rollout of a group ties and the update is 0.
            # Rows past the tokenizer zeroed (tied with lm_head), their logits are 0 while the top-10 of the
            # tokenizer's ~500 random logits lie ~2 standard deviations above: replies are text the judge tells apart.
            with torch.no_grad():
                model.get_input_embeddings().weight[len(processor.tokenizer):] = 0
            # Still, a random model replies at every turn and its replies all score 0: on the first H100 run every
            # group tied in both steps, and no update was measured. Taught to give the first gold answer at half the
            # turns and NO REPLY at the others, its rollouts differ in when they speak, and so do their rewards.
            teach_silence(model, processor, frame_pool(args), args.frames_per_turn, steps=20,
                          reply=json.load(open(anno))[0]["answer"][0]["content"])
            init = os.path.join(work, "init")
            model.save_pretrained(init)
            processor.save_pretrained(init)
            del model  # and its memory back from torch's caching allocator: grpo.py runs in another process
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--init", init, "--anno", anno,
               "--out", os.path.join(work, "run"), "--judge", "offline", "--max-steps", str(args.steps),
               "--group", str(args.group), "--segment", str(args.segment), "--interval", str(args.interval),
               "--frames-per-turn", str(args.frames_per_turn), "--frame-tokens", str(args.frame_tokens),
               "--max-new-tokens", str(args.max_new_tokens), "--save-every", "0", "--lr", str(args.lr),
               "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing"]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"bench.py grpo: grpo.py failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
        steps = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))]
        # A step whose groups all tied (reward spread 0) has advantages 0 and moves nothing, by construction: the
        # share of weights moved says something about precision only where some group had a spread
        signal = any(s["reward_std"] > 0 for s in steps)
        moved = moved_fraction(init, os.path.join(work, "run", "final")) if signal and os.path.isdir(init) else None
    timed = steps[1:] or steps  # the first step pays one-time costs (allocator, kernels)
    n_turns = max(1, round(args.segment / (args.interval * args.frames_per_turn))) * args.group  # 1 episode per step
    parts = ("episodes", "rollout", "judge", "update")  # episodes: the wait for frames read ahead on a thread
    total = [sum(s[f"time_{k}"] for k in parts) for s in timed]
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what grpo.py picks
    args.compute = torch.bfloat16 if args.device.type == "cuda" else torch.float32  # mmduet2.load_model's default
    share = {k: float(np.mean([s[f"time_{k}"] / t for s, t in zip(timed, total)])) for k in parts}
    result = dict(command="grpo", machine=machine(args), step_s=float(np.mean(total)), share=share,
                  rollout_turns_per_s=float(np.mean([n_turns / s["time_rollout"] for s in timed])),
                  generated_tokens=float(np.mean([s["tokens"] for s in timed])), moved_fraction=moved,
                  reward_std=[s["reward_std"] for s in steps], frac_reward_zero_std=[s["frac_reward_zero_std"] for s in steps],
                  logprob_gap=float(np.mean([s["logprob_gap"] for s in timed])),
                  config=dict(steps=len(steps), timed_steps=len(timed), group=args.group, segment_s=args.segment,
                              turns_per_step=n_turns, max_new_tokens=args.max_new_tokens))
    spread = ", ".join(f"{x:.3f}" for x in result["reward_std"])
    lines = md_table(["step s", "rollout turns/s", "generated tokens", "episodes", "rollout", "judge", "update",
                      "reward spread", "weights moved", "log p gap"],
                     [[f"{result['step_s']:.2f}", f"{result['rollout_turns_per_s']:.1f}", f"{result['generated_tokens']:.0f}"]
                      + [f"{share[k]:.0%}" for k in share] + [spread, "-" if moved is None else f"{moved:.2%}",
                                                              f"{result['logprob_gap']:.2e}"]])
    lines += ["", f"{len(timed)} of {len(steps)} steps timed; {n_turns} turns per step ({args.group} rollouts × "
              f"{n_turns // args.group} turns), offline judge, at most {args.max_new_tokens} new tokens per turn, "
              f"lr {args.lr:g}. Episodes: the step's wait for frames read ahead on a thread. Reward spread: the std of "
              "a group's rewards, per step. Weights moved: the share of trained weights that differ after "
              f"{len(steps)} step(s), for a checkpoint and only where some group had a spread (a step whose groups all "
              "tie has advantages 0 and moves nothing); log p gap: |rollout − training| log-prob per generated token."]
    return report(args, "grpo", result, lines)


# ----------------------------------------------------------------------------
# memory: what an SFT and a GRPO step hold per GPU at full scale, on a model that holds no memory


def bench_memory(args):
    args.device, args.compute = torch.device("meta"), torch.bfloat16  # for machine(): fake tensors, bf16 autocast
    _, processor = mmduet2.tiny_model()  # the tokenizer and image processor (14-px patches, 2×2 merge, as the 3B)
    mmduet2.set_frame_tokens(processor, args.frame_tokens)
    model = memory_probe.fake_3b(qwen_3b_config(processor, args.layers))
    text, fpt = model.config.text_config, args.frames_per_turn
    merge = model.config.vision_config.spatial_merge_size ** 2  # ViT patches per LLM token

    # The sequences, through our own template: an SFT dialogue cut at --seq-len; a GRPO rollout = the
    # context and the segment (rollout_frames frames, in turns of frames_per_turn: FIXED) + what it generated.
    def dialogue(n_turns, max_tokens=None):
        seq = mmduet2.encode_dialogue(processor, *silent_dialogue(n_turns, frame_pool(args), fpt), max_tokens=max_tokens)
        return dict(tokens=len(seq.ids), frames=len(seq.grids), image_tokens=sum(seq.mm_types),
                    patches=merge * sum(seq.mm_types))
    tpf = mmduet2.frame_tokens(*args.frame_size, args.frame_tokens)
    sft = dialogue(args.seq_len // (tpf * fpt) + 1, args.seq_len)
    sft["supervised"] = round(args.supervised * sft["tokens"])
    grpo = dialogue(args.rollout_frames // fpt)
    grpo["tokens"] += args.generated_tokens
    grpo["supervised"] = args.generated_tokens
    # A rollout's largest forwards: the context's prefill (1 row; here as long as all the rollout's frames, an upper
    # bound) and one turn of the G rows (its frames, then the NO REPLY draft checked in the same forward)
    turn = len(mmduet2.encode_user(processor, None, frame_pool(args)(0)).ids) + 3  # + "NO REPLY<|im_end|>"
    prefill = dict(tokens=grpo["tokens"] - args.generated_tokens, patches=grpo["patches"], supervised=4)
    group_turn = dict(tokens=args.group * turn, patches=merge * fpt * tpf, supervised=4 * args.group)

    # Arithmetic on the parameters of the model itself (model.parameters() lists the tied embedding once)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trained)  # gradients have their parameter's dtype
    n_all, n_trained = sum(p.numel() for p in params), sum(p.numel() for p in trained)
    kv_token = text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    kv = lambda rows, tokens, nbytes=2: rows * tokens * kv_token * nbytes  # noqa: E731  rows × L × layers × (K, V) × heads × dims
    features = grpo["image_tokens"] * text.hidden_size * 2  # the merger's bf16 output, shared by the G rows

    # Measured: what one training step saves and holds alive, per sequence; then SFT without checkpointing
    def measure(shape, one_layer=0, grad=True):  # grad=False: nothing saved, no backward
        probe = memory_probe.step_bytes(model, shape, grad=grad)
        saved = {f"saved_{part}": probe.saved[part] for part in ("layers", "outside", "logits")}
        return dict(saved, one_layer=one_layer, saved_plus_layer=sum(saved.values()) + one_layer, logits_peak=probe.peak["logits"],
                    forward_peak=probe.peak["forward"], backward_peak=probe.peak["backward"])
    measured = {name: measure(shape, memory_probe.layer_bytes(model, shape["tokens"])) for name, shape in (("sft", sft), ("grpo", grpo))}
    # the rollouts: forwards without autograd in one autocast region, so autocast's bf16 copy of every trained weight
    # it casts lives through all of them (a 1-token forward holds little else: that copy, measured)
    for name, shape in (("prefill", prefill), ("turn", group_turn), ("cast", dict(tokens=1, patches=4, supervised=1))):
        measured[name] = measure(shape, grad=False)
    model.activation_checkpointing_disable()
    measured["sft_no_ckpt"] = measure(sft, 0)  # nothing is recomputed

    # The columns: the recipe for SFT and GRPO (its update, then its rollouts), then the alternatives it rejected,
    # one change each. Under accumulation the gradients sit in DDP's buckets from one micro-batch to the next;
    # "fresh gradients" is a no_sync micro-batch whose gradients were None (zero_grad's default, or bucket view off).
    def column(m, kv_bytes=0, feature_bytes=0, fresh_grads=False, fused=True):
        row = dict(weights=weights, gradients=grads, adam=2 * grads, ddp_copy=grads if fresh_grads else 0,
                   kv_cache=kv_bytes, vision_features=feature_bytes, autocast_cache=measured["cast"]["forward_peak"])
        row.update(m, optimizer_temporaries=0 if fused else grads)  # foreach: sqrt(v) of every parameter at once
        row["held"] = sum(row[k] for k in ("weights", "gradients", "adam", "ddp_copy", "kv_cache", "vision_features"))
        row["peak"] = row["held"] + max(m["forward_peak"], m["backward_peak"], row["optimizer_temporaries"])
        row["headroom"] = round(args.card_gib * GIB) - row["peak"]
        return row

    def rollouts(nbytes=2):
        """The larger of a rollout's two moments: the context's prefill (its cache: 1 row), or the G rows' last turn
        (their caches at full length). The update's KV cache is 0: the group's cache is freed when its rollouts end."""
        start = column(measured["prefill"], kv(1, prefill["tokens"], nbytes), features)
        end = column(measured["turn"], kv(args.group, grpo["tokens"], nbytes), features)
        return dict(max((start, end), key=lambda c: c["peak"]), moment="prefill" if start["peak"] > end["peak"] else "last turn")
    columns = {"SFT": column(measured["sft"]), "GRPO, update": column(measured["grpo"], 0, features),
               "GRPO, rollouts": rollouts(),
               "SFT, fresh gradients": column(measured["sft"], fresh_grads=True),
               "SFT, foreach AdamW": column(measured["sft"], fused=False),
               "SFT, no checkpointing": column(measured["sft_no_ckpt"]),
               "GRPO rollouts, fp32 KV cache": rollouts(nbytes=4)}
    result = dict(command="memory", machine=machine(args, n_all), columns=columns,
                  params=dict(all=n_all, trained=n_trained, frozen=n_all - n_trained),
                  config=dict(sft=sft, grpo=grpo, prefill=prefill, group_turn=group_turn, layers=text.num_hidden_layers,
                              frame_size=list(args.frame_size), tokens_per_frame=tpf, frames_per_turn=fpt,
                              supervised_fraction=args.supervised, group=args.group, card_gib=args.card_gib))
    return report(args, "memory", result, memory_lines(result))


MEMORY_ROWS = [  # (key in each JSON column, label, where the number comes from): the table of bench.py memory
    ("weights", "weights: fp32, {all:.2f} B params", "4 B × all params"),
    ("gradients", "gradients: fp32, {trained:.2f} B trained params, in DDP's buckets", "4 B × trained"),
    ("adam", "AdamW: 2 fp32 moments per trained param", "8 B × trained"),
    ("ddp_copy", "DDP: fresh gradients beside the buckets (a no_sync micro-batch after zero_grad(set_to_none=True), "
                 "or bucket view off)", "4 B × trained"),
    ("kv_cache", "GRPO rollouts: KV cache, bf16 (1 row at the prefill, G = {group} at the last turn)",
     "rows × L × layers × (K, V) × 2 heads × 128 × 2 B"),
    ("vision_features", "GRPO: the episode's vision features, bf16 (the rows keep them into the update)",
     "image tokens × 2048 × 2 B"),
    ("held", "**held through the step**", "sum of the above"),
    ("saved_layers", "saved: the {layers} decoder layers (checkpointed: each one's fp32 input)", "measured"),
    ("saved_outside", "saved: embeddings, merger, final norm", "measured"),
    ("saved_logits", "saved: lm_head (its bf16 weight copy) + logits + loss", "measured"),
    ("one_layer", "saved by the one layer that backward recomputes", "measured"),
    ("saved_plus_layer", "all saved + one layer (the usual estimate)", "sum of the above"),
    ("logits_peak", "lm_head + logits + loss at their peak", "measured (live)"),
    ("autocast_cache", "autocast's bf16 copies of the trained weights (part of every forward peak below; a "
                       "rollout's last through all of a step's rollouts)", "measured (live)"),
    ("forward_peak", "activations at the forward's peak", "measured (live)"),
    ("backward_peak", "activations at the backward's peak", "measured (live)"),
    ("optimizer_temporaries", "optimizer step: temporaries (foreach: √v of all params)", "4 B × trained"),
    ("peak", "**peak = held + max(forward, backward, optimizer step)**", ""),
    ("headroom", "**headroom on {card_gib} GiB**", ""),
]


def memory_lines(result):
    """The Markdown of bench_memory: one table (GiB per GPU), then what each row means and the verdict."""
    cols, c, p = result["columns"], result["config"], result["params"]
    s, g = c["sft"], c["grpo"]
    fields = dict(c, all=p["all"] / 1e9, trained=p["trained"] / 1e9)
    lines = md_table(["GiB per GPU", "how", *cols], [[label.format(**fields), how, *(f"{col[key] / GIB:.2f}" for col in cols.values())]
                                                      for key, label, how in MEMORY_ROWS])
    gib = lambda name: f"{name} {cols[name]['peak'] / GIB:.1f} GiB (headroom {cols[name]['headroom'] / GIB:+.1f})"  # noqa: E731
    recipe = ("SFT", "GRPO, update", "GRPO, rollouts")
    fits = all(cols[name]["headroom"] >= 0 for name in recipe)
    pre, turn, ro = c["prefill"], c["group_turn"], cols["GRPO, rollouts"]
    lines += [
        "",
        f"Per GPU under DDP (every GPU a full replica), {p['trained'] / 1e9:.2f} B trained (LLM + merger) and "
        f"{p['frozen'] / 1e9:.2f} B frozen (ViT) parameters, fp32 weights with bf16 autocast, {c['layers']} LLM "
        f"layers. SFT: one dialogue of {s['tokens']:,} tokens ({s['frames']} frames of {c['frame_size'][1]}×"
        f"{c['frame_size'][0]} px = {c['tokens_per_frame']} tokens, {c['frames_per_turn']} per turn), logits at "
        f"{s['supervised']:,} supervised positions ({c['supervised_fraction']:.0%}, assumed); under accumulation the "
        f"gradients stay in DDP's buckets between micro-batches. GRPO update: one rollout of {g['tokens']:,} tokens "
        f"({g['frames']} frames + {g['supervised']} generated tokens, the supervised ones) while the episode's vision "
        "features are held (the group's KV cache is freed when its rollouts end). GRPO rollouts: no autograd, one "
        f"autocast region for all of a step's rollouts; the larger of two moments, here the {ro['moment']}: the "
        f"context's prefill ({pre['tokens']:,} tokens, 1 row of cache) or the G = {c['group']} rows' last turn "
        f"({turn['tokens'] // c['group']} tokens each, their caches at {g['tokens']:,} tokens).",
        "",
        "- How each row is obtained (arithmetic on the parameter counts; measured on fake tensors: what autograd "
        "saves, what is alive at a peak): docs/performance.md.",
        "- Not counted: the CUDA context and NCCL buffers, the allocator's free cached blocks (fragmentation), the "
        "frozen ViT's transient forward (it runs before the LLM's activations pile up; not run here), and GRPO's "
        "one-time DDP bucket rebuild before its second update's forward, when the old and new buckets may briefly "
        "overlap (SFT looks for unused parameters, which keeps its first buckets).",
        "",
        f"**The recipe {'fits' if fits else 'does not fit'} on {c['card_gib']} GiB**: "
        + ", ".join(gib(name) for name in recipe) + ". One change each: "
        + "; ".join(gib(name) for name in cols if name not in recipe) + ".",
    ]
    return lines


# ----------------------------------------------------------------------------
# gpu: the prepared GPU check, one command on one GPU: the GPU tests, then the full-scale measurements


def turn_latency(model, processor, args, fpt, context=10, turns=20, reply_tokens=32):
    """p50/p95 ms of one turn after `context` turns, each on a cold fork of one stream: a silent turn (fast silence,
    as infer.py runs) and a replying turn of `reply_tokens` new tokens (min_new_tokens holds back <|im_end|>)."""
    frames_of = frame_pool(argparse.Namespace(frame_size=args.frame_size, frames_per_turn=fpt))
    base = engine.Stream(model, processor)
    for k in range(context):
        base.feed(None, frames_of(k))
        base.feed(mmduet2.SILENCE, role="assistant")
    base.prefill()
    greedy = engine.decoding(processor, max_new_tokens=100)
    replying = engine.decoding(processor, max_new_tokens=reply_tokens)
    replying.min_new_tokens = reply_tokens
    out = {}
    for mode, config, fast in (("silent", greedy, True), ("replying", replying, False)):
        times, replies = [], []
        for i in range(turns + 2):
            fork = cold_fork(base)
            t0 = clock(args.device)
            replies.append(fork.turn(frames_of(context + i), config=config, fast_silence=fast))
            times.append(clock(args.device) - t0)
        times, silent, reply = times[2:], [r.silent for r in replies[2:]], replies[-1]  # two warm-ups, not counted
        out[mode] = dict(p50_ms=ms(times), p95_ms=ms(times, 95), silent_fraction=float(np.mean(silent)),
                         new_tokens=len(reply.ids) - reply.forced_end)  # a cut reply's closing <|im_end|> was appended
    return out


def bench_gpu(args):
    """Every stage is timed and guarded: one that fails records its error and the others still run; the report
    is rewritten after each stage, so a run cut short keeps what it measured."""
    out, work = args.out, tempfile.mkdtemp(prefix="bench-gpu-")
    args.device, args.compute = torch.device(args.device or "cuda"), torch.bfloat16
    result = dict(command="gpu", machine=machine(args), stages={})
    seq_len, turns, context, steps, segment, reply_tokens = \
        (1000, 2, 2, 1, 8.0, 8) if args.quick else (10_000, 20, 10, 2, 20.0, 32)
    result["config"] = dict(model=args.model, layers=args.layers, quick=args.quick, frame_size=[448, 224],
                            latency_context_turns=context, latency_turns=turns, sft_seq_len=seq_len, grpo_steps=steps)

    def sub(command, **kw):  # the arguments of another command, with its fixed settings, at the paper's frames
        return argparse.Namespace(**{**vars(args), **FIXED[command], "out": work, "frame_size": (448, 224),
                                     "frames_per_turn": 2, **kw})

    def stage(name, run):
        t0 = time.time()
        try:
            result["stages"][name] = run()
        except (Exception, SystemExit) as e:  # a stage's failure is a finding, not the end of the check
            result["stages"][name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        result["stages"][name]["seconds"] = round(time.time() - t0, 1)
        report(argparse.Namespace(out=out), "gpu", result, gpu_lines(result))

    def tests():
        run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              os.path.join("tests", "test_gpu.py")], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, MMDUET2_TEST_DEVICE=args.device.type))
        return dict(returncode=run.returncode, summary=(run.stdout.strip().splitlines() or [""])[-1],
                    tail=run.stdout[-3000:] + run.stderr[-1000:] if run.returncode else "")

    def latency():
        a = sub("stream", dtype="bf16", silence_steps=10)
        model, processor, info = setup(a)  # bf16 weights, as infer.py loads them on a GPU
        result["machine"] = info
        # 2 frames a turn, context + 1 turns: the longest stream timed
        loss = teach_silence(model, processor, frame_pool(a), a.frames_per_turn, a.silence_steps, n_turns=context + 1)
        return {"silence_loss": loss,
                **{str(fpt): turn_latency(model, processor, a, fpt, context, turns, reply_tokens) for fpt in (1, 2)}}

    def sft():
        r = bench_sft(sub("sft", dtype="bf16", seq_len=seq_len, steps=steps))
        out = dict(tokens_per_s=r["tokens_per_s"], step_s=r["step_s"], peak_memory_gib=r["peak_memory_gib"],
                   predicted_peak_gib=None, config=r["config"])
        if args.model == "3b":  # the same dialogue on paper: what bench.py memory predicts for this step
            supervised = r["config"]["supervised_tokens"] / r["config"]["seq_len"]
            predicted = bench_memory(sub("memory", seq_len=seq_len, supervised=supervised, threads=0))
            out["predicted_peak_gib"] = round(predicted["columns"]["SFT"]["peak"] / GIB, 2)
        return out

    def grpo():
        r = bench_grpo(sub("grpo", steps=steps, segment=segment, interval=2.0, max_new_tokens=32))
        return {k: r[k] for k in ("step_s", "share", "rollout_turns_per_s", "generated_tokens", "reward_std",
                                  "frac_reward_zero_std", "moved_fraction", "logprob_gap", "config")}

    for name, run in (("tests", tests), ("latency", latency), ("sft", sft), ("grpo", grpo)):
        if name != "tests" or not args.quick:
            stage(name, run)
        torch.cuda.empty_cache() if args.device.type == "cuda" else None
    return result


def gpu_lines(result):
    """The Markdown of bench_gpu: what each stage measured, or why it failed."""
    st, lines = result["stages"], []
    ok = {name: v for name, v in st.items() if "error" not in v}  # the stages that measured something
    if "tests" in st:
        t = st["tests"]
        lines += [f"GPU tests (`pytest -m gpu`): {t.get('summary') or t.get('error')}", ""]
        lines += ["```", t["tail"].strip(), "```", ""] if t.get("tail") else []
    if "latency" in ok:
        rows = [[fpt, mode, v["p50_ms"], v["p95_ms"], v["new_tokens"], f"{v['silent_fraction']:.0%}"]
                for fpt, modes in st["latency"].items() if fpt.isdigit() for mode, v in modes.items()]
        c = result["config"]
        model = "Qwen2.5-VL-3B's architecture" + (f" at {c['layers']} layers" if c["layers"] else "") if c["model"] == "3b" \
            else c["model"]
        lines += [f"Per-turn latency of {model} (random weights, bf16), 448×224 frames = 128 tokens, after "
                  f"{c['latency_context_turns']} turns, {c['latency_turns']} turns each (the paper: ~160 ms per turn on an H100):", ""]
        lines += md_table(["frames per turn", "turn", "p50 ms", "p95 ms", "tokens out", "silent"], rows) + [""]
        if any(r[1] == "silent" and r[5] != "100%" for r in rows):  # then that row timed replies, not silence
            lines += [f"**A 'silent' row was not silent** (NO REPLY taught to a loss of {st['latency']['silence_loss']}):"
                      " it times replies, not a silent turn.", ""]
    if v := ok.get("sft"):
        predicted = f" (bench.py memory predicts {v['predicted_peak_gib']:.1f} GiB)" if v["predicted_peak_gib"] else ""
        lines += [f"SFT step at {v['config']['seq_len']:,} tokens (bf16 autocast over fp32, checkpointing, fused AdamW): "
                  f"{v['tokens_per_s']:,.0f} tokens/s, {v['step_s']:.2f} s per step, peak {v['peak_memory_gib']:.1f} GiB"
                  f"{predicted}.", ""]
    if v := ok.get("grpo"):
        split = ", ".join(f"{k} {x:.0%}" for k, x in v["share"].items())
        spread = ", ".join(f"{x:.3f}" for x in v["reward_std"])
        moved = "no group's rewards differed (spread 0): advantages 0, no update to measure" if max(v["reward_std"]) == 0 \
            else "-" if v["moved_fraction"] is None else f"the update moved {v['moved_fraction']:.2%} of the trained weights"
        lines += [f"GRPO step (grpo.py, G = 4, ≤ 32 new tokens, lr 1e-6): {v['step_s']:.1f} s ({split}); "
                  f"{v['rollout_turns_per_s']:.1f} rollout turns/s; reward spread (std within a group) per step: {spread}; "
                  f"{moved}; log-prob gap rollout/training {v['logprob_gap']:.1e} per token.", ""]
    failed = [name for name, v in st.items() if "error" in v or v.get("returncode")]
    lines += [f"**Failed stage{'s' * (len(failed) > 1)}: {', '.join(failed)}**" if failed else "No stage failed."]
    lines += [f"- {name}: {v['error']}" for name, v in st.items() if "error" in v]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v['seconds']}" for k, v in st.items())]
    return lines


def parse_args(argv=None):
    # a bad flag is one line, as every other bad input (argparse would print the whole usage first)
    p = runs.argument_parser("bench.py", __doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)  # the flags every command takes
    # model and machine (grpo.py picks its own device and dtype)
    common.add_argument("--model", help="tiny | a checkpoint folder | 3b: a random Qwen2.5-VL-3B, no download "
                                        "(default: tiny; 3b for memory and gpu)")
    common.add_argument("--layers", type=int, default=0, help="--model 3b only: keep this many LLM layers and vision blocks")
    common.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    common.add_argument("--out", default="bench", help="folder for NAME.json and NAME.md")
    common.add_argument("--frame-size", type=int, nargs=2, metavar=("H", "W"),
                        help="frame size (default: 84 84; memory: 224 448, the paper's 128 tokens)")
    s = sub.add_parser("stream", parents=[common], help="per-turn latency: KV cache vs re-encoding; silent turns")
    s.add_argument("--turns", type=int, default=200, help="turns to stream")
    t = sub.add_parser("sft", parents=[common], help="one SFT step: tokens/s and peak memory")
    t.add_argument("--seq-len", type=int, default=2048, help="tokens of the synthetic dialogue (paper: up to 10,000)")
    t.add_argument("--steps", type=int, default=3, help="timed steps")
    g = sub.add_parser("grpo", parents=[common], help="GRPO steps of grpo.py: rollout turns/s, time shares")
    g.add_argument("--steps", type=int, default=3, help="GRPO steps (the first is not timed when there are more)")
    m = sub.add_parser("memory", parents=[common], help="per-GPU memory of SFT and GRPO steps at 3B (DDP), on fake tensors")
    m.add_argument("--seq-len", type=int, default=10_000, help="tokens of one SFT dialogue (paper: at most 10,000)")
    gp = sub.add_parser("gpu", parents=[common], help="the prepared GPU check: GPU tests, 3B latency, SFT and GRPO steps")
    gp.add_argument("--quick", action="store_true",
                    help="a dry run at small sizes, measurements only, without pytest -m gpu (e.g. --device cpu --model tiny)")
    lv = sub.add_parser("live", parents=[common], help="hours of an endless stream: bounded context vs unbounded (issue 27)")
    lv.add_argument("--minutes", type=float, default=120, help="stream-minutes of the bounded run (the unbounded: <= 30)")
    for command in sub.choices.values():  # a sub-command's parser reports its own flags' errors: one line too
        command.error = p.error
    args = p.parse_args(argv)
    full_scale = args.command in ("memory", "gpu")  # Qwen2.5-VL-3B (memory: at the paper's frames, 448×224 px)
    args.model = args.model or ("3b" if full_scale else "tiny")
    args.frame_size = tuple(args.frame_size or ((224, 448) if full_scale or args.command == "live" else (84, 84)))
    if args.command == "memory" and args.model != "3b":
        p.error("memory models Qwen2.5-VL-3B's architecture: --model 3b")
    vars(args).update(EVERY, **FIXED[args.command])
    if args.command == "stream" and args.model not in ("tiny", "3b"):
        args.silence_steps = 0  # training a real checkpoint would spoil it
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"stream": bench_stream, "sft": bench_sft, "grpo": bench_grpo, "memory": bench_memory,
              "gpu": bench_gpu, "live": bench_live}[args.command](args)
    failed = [name for name, v in result.get("stages", {}).items() if "error" in v or v.get("returncode")]
    if failed:  # the GPU check's report is written; its exit status says it did not pass
        raise SystemExit(f"bench.py gpu: failed stage(s): {', '.join(failed)} (see {os.path.join(args.out, 'gpu.md')})")
    return result


if __name__ == "__main__":
    main()
