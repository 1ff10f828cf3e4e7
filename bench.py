"""Performance: what a streamed turn, an SFT step and a GRPO step cost, written as JSON + a Markdown table.

Role: a side tool of the pipeline (data → SFT → GRPO → infer). It checks the cost argument of
spec/streaming.md on our own code: a KV-cached stream (mmduet2.Stream) encodes only the new turn,
while re-encoding the whole conversation costs more at every turn (O(turns²) over a video).

    python bench.py stream --model tiny                      # CPU, ~20 s: cache vs re-encode, silent turns
    python bench.py stream --model 3b --device cuda --frame-size 224 448      # random 3B, bf16, 128 tok/frame
    python bench.py stream --model 3b --layers 1 --turns 10 --repeats 1 --silent-turns 3 --silence-steps 10
                                                             # the 3B code path on a CPU, 1 layer (~2 min)
    python bench.py sft --model tiny                         # tokens/s and peak memory of one SFT step
    python bench.py sft --model 3b --device cuda --seq-len 10000 --frame-size 224 448
    python bench.py grpo --model tiny --steps 3              # runs grpo.py, reads its metrics.jsonl

Each command writes OUT/NAME.json and OUT/NAME.md (--out, default bench/), naming the machine. On a
CPU shared with other jobs use --threads 1: OpenMP threads spin-waiting for a busy core made a
2-thread tiny-model forward 30x slower in our dev runs.

How it measures:
  1. stream: every assistant turn is a teacher-forced NO REPLY. The cached cost of turn k is the
     prefill of its user + assistant turn on a fork of the stream (--repeats forks, same cache);
     re-encoding is one full forward over the whole sequence at sampled turns. Silent turns time
     `Stream.turn` with and without fast silence against a bare prefill of the same user turn.
  2. sft: forward + backward + AdamW step of mmduet2.forward_logprobs on a synthetic dialogue, the
     vision encoder frozen except its merger and bf16 autocast over fp32 weights on GPU (as sft.py).
  3. grpo: grpo.py itself (`--judge offline`) on a small synthetic RL set, as a subprocess (scripts
     never import each other); the time shares come from its metrics.jsonl.

Choices a reader should know:
  1. `--model 3b` is Qwen2.5-VL-3B-Instruct's architecture with random weights (no download) and the
     tiny tokenizer, so token ids stay < 512: a forward costs the same whatever the ids and weights.
  2. A random model rarely says NO REPLY; before timing silent turns we train the last decoder layer
     for --silence-steps AdamW steps on an all-silent dialogue (skipped for a checkpoint folder).
  3. Targets are printed as PASS/FAIL lines, never asserted: timings belong to the machine.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

import mmduet2

ROOT = os.path.dirname(os.path.abspath(__file__))
# Qwen/Qwen2.5-VL-3B-Instruct's config.json. For the vision tower the file gives only hidden 1280,
# out 2048 and tokens_per_second 2; the other values are Qwen2_5_VLVisionConfig's defaults.
QWEN_3B_TEXT = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                    intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
QWEN_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SAMPLE_TURNS = (1, 10, 20, 40, 60, 100, 150, 200)  # where the table reports, and re-encoding is timed
WINDOW = 5  # latency "at turn k" pools turns k-4..k (× repeats), so a p95 has samples to stand on

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
    """Threads, device, compute dtype (into args); then (model, processor, machine description)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.compute = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    dtype = weights_dtype or args.compute
    torch.manual_seed(0)
    if args.model != "3b":
        model, processor = mmduet2.load_model(args.model, dtype=dtype, device=args.device, attn=args.attn,
                                              frame_tokens=args.frame_tokens)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        _, processor = mmduet2.tiny_model()  # tokenizer + image processor (14-px patches, 2×2 merge, as the 3B)
        mmduet2.set_frame_tokens(processor, args.frame_tokens)
        with torch.device(args.device):  # built where it runs, in its dtype: no 15 GB fp32 detour on the host
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                qwen_3b_config(processor, args.layers), dtype=dtype,
                **({"attn_implementation": args.attn} if args.attn else {})).eval()
    return model, processor, machine(args, model.num_parameters())


def machine(args, params=None):
    """What the numbers were measured on: CPU model, threads, versions, device, dtype, model."""
    import transformers
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    cuda = args.device.type == "cuda"
    return dict(cpu=cpu, cores=os.cpu_count(), threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, device=str(args.device),
                gpu=torch.cuda.get_device_name(args.device) if cuda else None,
                dtype=str(args.compute).replace("torch.", ""), model=args.model, params_m=params and round(params / 1e6, 2))


def clock(device):
    """Seconds; on CUDA wait for the queued kernels first, or we would time their launch, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def ms(seconds, q=50):
    return round(1000 * float(np.percentile(seconds, q)), 3)


def frame_pool(args, n=16):
    """n random frames of --frame-size; turn k gets the next --frames-per-turn of them, cyclically."""
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (*args.frame_size, 3), dtype=np.uint8) for _ in range(n)]
    fpt = args.frames_per_turn
    return lambda k: [pool[(k * fpt + i) % n] for i in range(fpt)]


def silent_dialogue(n_turns, frames_of, fpt):
    """(messages, frames) of a dialogue whose every assistant turn is NO REPLY."""
    messages = [{"role": r, "content": c} for _ in range(n_turns)
                for r, c in (("user", mmduet2.IMAGE * fpt), ("assistant", mmduet2.SILENCE))]
    return messages, [f for k in range(n_turns) for f in frames_of(k)]


def md_table(header, rows):
    """Markdown table lines; floats (milliseconds) with one decimal."""
    cell = lambda x: f"{x:,.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]


def report(args, name, result, lines):
    """Write OUT/name.json and OUT/name.md and print the Markdown."""
    m = result["machine"]
    head = [f"## bench.py {name}: {m['model']} on {m['gpu'] or m['cpu']} ({m['device']}, {m['dtype']}, "
            f"{m['threads']} threads, torch {m['torch']})", ""]
    if not m["gpu"]:
        result["gpu_pending"] = "GPU numbers (3B, bf16) are still to be measured: this run had no GPU."
        lines = lines + ["", result["gpu_pending"]]
    text = "\n".join(head + lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    json.dump(result, open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)
    open(os.path.join(args.out, f"{name}.md"), "w").write(text)
    print(text)
    return result


# ----------------------------------------------------------------------------
# stream: per-turn latency with the cache and re-encoding; silent turns; real-time factor


def teach_silence(model, processor, frames_of, args):
    """AdamW on an all-NO-REPLY dialogue, so that greedy turns come out silent.

    Only the last decoder layer and the final norm learn: enough to say NO REPLY, and affordable at
    3B (no optimizer state for 3B parameters). lr 1e-3: silent within 10 steps at both widths we
    tried (128 and 2048); 1e-2 oscillated at 2048. Timing does not depend on what the weights are.
    """
    lm = model.model.language_model
    params = list(lm.layers[-1].parameters()) + list(lm.norm.parameters())
    model.requires_grad_(False)  # no gradients for the rest: at full 3B depth they would not fit in 24 GiB
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    seq = mmduet2.encode_dialogue(processor, *silent_dialogue(8, frames_of, args.frames_per_turn))
    model.train()
    for _ in range(args.silence_steps):
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

    def cold_fork(stream):  # a fork that runs the vision encoder itself, as a live stream sees each frame once
        fork = stream.fork()
        fork.vision = {}
        return fork

    def teacher_forced(s, k):  # user turn k + its NO REPLY → (seconds encoding them, seconds prefilling them)
        t0 = clock(dev)
        s.feed(None, frames_of(k))
        s.feed(mmduet2.SILENCE, role="assistant")
        t1 = clock(dev)
        s.prefill()
        return t1 - t0, clock(dev) - t1

    warm = mmduet2.Stream(model, processor)  # warm-up: allocator, kernel choice, the processor's first call
    for k in range(3):
        teacher_forced(warm, k)
    reencode(warm.seq)

    # 1. Turn k with the cache (each repeat on a fresh fork: same turn, same cache) vs re-encoding
    sample = sorted({k for k in SAMPLE_TURNS if k <= args.turns} | {args.turns})
    stream = mmduet2.Stream(model, processor)
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
    loss = teach_silence(model, processor, frames_of, args) if args.silence_steps else None
    base = mmduet2.Stream(model, processor)
    for k in range(args.context):
        base.feed(None, frames_of(k))
        base.feed(mmduet2.SILENCE, role="assistant")
    base.prefill()
    times, silent = {"fast": [], "slow": [], "bare": []}, {"fast": [], "slow": []}
    for i in range(args.silent_turns + 1):  # i = 0 is a warm-up, not counted
        frames, forks = frames_of(args.context + i), {m: cold_fork(base) for m in times}
        for mode, s in forks.items():
            t0 = clock(dev)
            if mode == "bare":  # the floor: encode and prefill the user turn, decide nothing
                s.feed(None, frames)
                s.prefill()
            else:
                reply = s.turn(frames, fast_silence=mode == "fast",
                                   config=mmduet2.decoding(processor, max_new_tokens=args.max_new_tokens))
            if i:
                times[mode].append(clock(dev) - t0)
                if mode != "bare":
                    silent[mode].append(reply.silent)
    sil = dict(context_turns=args.context, turns=args.silent_turns, train_steps=args.silence_steps, train_loss=loss,
               **{f"{m}_p50_ms": ms(t) for m, t in times.items()}, **{f"{m}_p95_ms": ms(t, 95) for m, t in times.items()},
               **{f"silent_fraction_{m}": float(np.mean(v)) for m, v in silent.items()})

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
        cache_flat=dict(text=f"cached turn {args.turns} <= 1.5x cached turn {ref}", value=round(flat, 2), ok=flat <= 1.5),
        reencode_10x=dict(text=f"re-encoding >= 10x cached, at turn {k60}", value=slower and round(slower, 1),
                          ok=None if k60 is None else slower >= 10),
        fast_silence=dict(text="silent turn with fast silence <= 1.3x bare prefill", value=round(fast, 2), ok=fast <= 1.3,
                          note=None if sil["silent_fraction_fast"] > 0.5 else "the model was not silent"))
    for t in targets.values():
        t["pass"] = t.pop("ok")
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
                               f"{sil[f'silent_fraction_{m}']:.0%}" if m in silent else "-"]
                              for m, label in (("fast", "turn(), fast silence"), ("slow", "turn(), plain decoding"),
                                               ("bare", "bare prefill of the user turn"))])
    lines += ["", f"Real-time factor at 1 frame/s, turn {args.turns}: {rtf['cached_p50']:.3f} (p50), "
              f"{rtf['cached_p95']:.3f} (p95); a silent turn: {rtf['silent_fast_p50']:.3f}.", ""]
    lines += [f"- {'N/A' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'}: {t['text']} "
              f"(measured {t['value']}{'; ' + t['note'] if t.get('note') else ''})" for t in targets.values()]
    return report(args, "stream", result, lines)


# ----------------------------------------------------------------------------
# sft: one training step (forward + backward + AdamW) on a synthetic dialogue


def bench_sft(args):
    model, processor, info = setup(args, weights_dtype=torch.float32)  # fp32 master weights, as sft.py
    dev, (h, w), fpt = args.device, args.frame_size, args.frames_per_turn
    tpf = mmduet2.frame_tokens(h, w, args.frame_tokens)
    # The paper's SFT: the vision encoder is frozen, its merger (into the LLM's space) is trained.
    model.model.visual.requires_grad_(False)
    model.model.visual.merger.requires_grad_(True)
    if args.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_turns = args.seq_len // (tpf * fpt) + 1  # more than enough; cut to --seq-len (never inside a frame)
    seq = mmduet2.encode_dialogue(processor, *silent_dialogue(n_turns, frame_pool(args), fpt), max_tokens=args.seq_len)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-5)
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" and args.compute == torch.bfloat16 else nullcontext()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # the weights stay allocated, so the peak still counts them
    times = []
    for i in range(args.warmup + args.steps):
        t0 = clock(dev)
        with amp:
            loss = -mmduet2.forward_logprobs(model, seq).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
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


def write_rl_set(folder, args, n_videos=2):
    """n noise mp4s (PyAV) + an anno.json in the ProactiveVideoQA format, two gold events per video."""
    import av
    (h, w), seconds = args.frame_size, max(16, 2 * round(args.segment))
    os.makedirs(os.path.join(folder, "videos"))
    anno, rng = [], np.random.default_rng(0)
    for i in range(n_videos):
        with av.open(os.path.join(folder, "videos", f"v{i}.mp4"), "w") as out:
            st = out.add_stream("libx264", rate=10)
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            frames = (av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(seconds * 10))
            for packet in [p for f in frames for p in st.encode(f)] + list(st.encode()):
                out.mux(packet)
        events = [("A red square appeared on the left.", 0.2 * seconds), ("A blue square appeared on the top.", 0.6 * seconds)]
        anno.append({"video": f"v{i}.mp4", "question_id": f"q{i}", "duration": float(seconds),
                     "conversation": [{"role": "user", "content": "Tell me whenever a new shape appears.", "time": 0.0}],
                     "answer": [{"role": "assistant", "content": text, "related_timespan": [t, t + 3],
                                 "reply_timespan": [t, t + 4]} for text, t in events]})
    json.dump(anno, open(os.path.join(folder, "anno.json"), "w"))
    return os.path.join(folder, "anno.json")


def bench_grpo(args):
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as work:
        cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--init", args.model, "--anno", write_rl_set(work, args),
               "--out", os.path.join(work, "run"), "--judge", "offline", "--max-steps", str(args.steps),
               "--group", str(args.group), "--segment", str(args.segment), "--interval", "1",
               "--frames-per-turn", str(args.frames_per_turn), "--frame-tokens", str(args.frame_tokens),
               "--max-new-tokens", str(args.max_new_tokens), "--save-every", "1000000",
               "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing"]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"bench.py grpo: grpo.py failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
        steps = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))]
    timed = steps[1:] or steps  # the first step pays one-time costs (allocator, kernels)
    n_turns = max(1, round(args.segment / args.frames_per_turn)) * args.group  # 1 frame/s, 1 episode per step
    total = [s["time_rollout"] + s["time_judge"] + s["time_update"] for s in timed]
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what grpo.py picks
    args.compute = torch.bfloat16 if args.device.type == "cuda" else torch.float32  # mmduet2.load_model's default
    share = {k: float(np.mean([s[f"time_{k}"] / t for s, t in zip(timed, total)])) for k in ("rollout", "judge", "update")}
    result = dict(command="grpo", machine=machine(args), step_s=float(np.mean(total)), share=share,
                  rollout_turns_per_s=float(np.mean([n_turns / s["time_rollout"] for s in timed])),
                  generated_tokens=float(np.mean([s["tokens"] for s in timed])),
                  config=dict(steps=len(steps), timed_steps=len(timed), group=args.group, segment_s=args.segment,
                              turns_per_step=n_turns, max_new_tokens=args.max_new_tokens))
    lines = md_table(["step s", "rollout turns/s", "generated tokens", "rollout", "judge", "update"],
                     [[f"{result['step_s']:.2f}", f"{result['rollout_turns_per_s']:.1f}", f"{result['generated_tokens']:.0f}"]
                      + [f"{share[k]:.0%}" for k in share]])
    lines += ["", f"{len(timed)} of {len(steps)} steps timed; {n_turns} turns per step ({args.group} rollouts × "
              f"{n_turns // args.group} turns), offline judge, at most {args.max_new_tokens} new tokens per turn."]
    return report(args, "grpo", result, lines)


# ----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # model and machine (grpo.py picks its own device and dtype)
    common.add_argument("--model", default="tiny", help="tiny | a checkpoint folder | 3b (random Qwen2.5-VL-3B, no download)")
    common.add_argument("--layers", type=int, default=0, help="--model 3b only: keep this many LLM layers and vision blocks")
    common.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    common.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="compute dtype (auto: bf16 on GPU)")
    common.add_argument("--attn", default=None, help="attention implementation, e.g. flash_attention_2 (default: sdpa)")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    common.add_argument("--out", default="bench", help="folder for NAME.json and NAME.md")
    # frames
    common.add_argument("--frame-size", type=int, nargs="+", default=[84], metavar="H W", help="frame size (one value: square)")
    common.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS, help="cap on LLM tokens per frame (paper: 128)")
    common.add_argument("--frames-per-turn", type=int, default=1, help="frames per user turn (paper: 1-2)")
    s = sub.add_parser("stream", parents=[common], help="per-turn latency: KV cache vs re-encoding; silent turns")
    s.add_argument("--turns", type=int, default=200, help="turns to stream")
    s.add_argument("--repeats", type=int, default=3, help="timings per measurement")
    s.add_argument("--reencode-max", type=int, default=200, help="time re-encoding only at sampled turns up to this one")
    s.add_argument("--silence-steps", type=int, default=None, help="steps teaching NO REPLY (default: 50; 0 for a folder)")
    s.add_argument("--context", type=int, default=10, help="turns streamed before the timed silent turns")
    s.add_argument("--silent-turns", type=int, default=20, help="silent turns timed per mode")
    s.add_argument("--max-new-tokens", type=int, default=32, help="cap on a reply, if the model does speak")
    t = sub.add_parser("sft", parents=[common], help="one SFT step: tokens/s and peak memory")
    t.add_argument("--seq-len", type=int, default=2048, help="tokens of the synthetic dialogue (paper: up to 10,000)")
    t.add_argument("--steps", type=int, default=3, help="timed steps")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    t.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (paper: on)")
    g = sub.add_parser("grpo", parents=[common], help="GRPO steps of grpo.py: rollout turns/s, time shares")
    g.add_argument("--steps", type=int, default=3, help="GRPO steps (the first is not timed when there are more)")
    g.add_argument("--group", type=int, default=4, help="rollouts per episode (G)")
    g.add_argument("--segment", type=float, default=10.0, help="seconds (= turns at 1 frame/s) each rollout answers")
    g.add_argument("--max-new-tokens", type=int, default=16, help="max new tokens per turn")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the update (grpo.py's default)")
    args = p.parse_args(argv)
    if len(args.frame_size) not in (1, 2):
        p.error("--frame-size takes H W, or one value for a square frame")
    args.frame_size = tuple(args.frame_size * (3 - len(args.frame_size)))  # [84] → (84, 84)
    if args.command == "stream" and args.silence_steps is None:
        args.silence_steps = 50 if args.model in ("tiny", "3b") else 0  # training a real checkpoint would spoil it
    if args.command == "grpo" and args.model == "3b":
        p.error("grpo runs grpo.py, which loads a checkpoint: pass --model tiny or a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    return {"stream": bench_stream, "sft": bench_sft, "grpo": bench_grpo}[args.command](args)


if __name__ == "__main__":
    main()
