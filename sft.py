"""SFT: teach Qwen2.5-VL to watch a stream and answer every turn, with a reply or NO REPLY (paper Sec. 4.2).

Pipeline:  data.py ──▶ **sft.py** ──▶ grpo.py ──▶ infer.py ──▶ evaluate.py

One example is one whole dialogue (data.py's SFT JSONL or the released MMDuet2-data one, plus an offline mix):
user turns that each bring 1–2 frames (+ maybe a question or a subtitle), each followed by the assistant's
answer or exactly "NO REPLY". mmduet2.encode_dialogue renders it with Qwen's chat template (frames resized to
at most --frame-tokens LLM tokens) and gives the loss mask; we train by teacher forcing:

    loss = − Σ log p(supervised token) / (supervised tokens in the whole optimizer step, all ranks)

Supervised = every assistant text + its <|im_end|>, NO REPLY turns included: staying silent is a decision
the model must learn (most turns are silent, which is why SFT alone replies rarely and late, Sec. 4.3).

Run it:
    python data.py toy --out data/toy                                            # the toy world's data
    python sft.py --toy                                                          # one torch thread: ~10 min, 4,000 steps
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        sft.py --toy                                                             # 2 CPU ranks (gloo DDP)
    accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \\
        sft.py --data data/web/sft.jsonl data/offline/llava.jsonl --grad-accum 4 --out runs/sft   # 8 GPUs
    # interrupted? the same command + --resume (it continues from OUT/step-N)
Output: OUT/step-N/ and OUT/final/ (docs/formats.md, "Runs"). Where we depart from the paper: docs/departures.md.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import mmduet2
import runs

# ----------------------------------------------------------------------------------------------
# Arguments (defaults = the released recipe; --toy = a CPU-sized run)

# the toy recipe (docs/toy.md): the random 0.6M-parameter tiny model needs a larger step than 1e-5; at 2e-3 × 20
# epochs one seed in a few ignored a question type, at 1e-3 × 10 with the offline mix (Sec. 4.2) none did (chosen
# on validation worlds)
TOY = dict(model="tiny", data=["data/toy/train/sft.jsonl", "data/toy/train/offline.jsonl"], out="runs/sft-toy",
           lr=1e-3, epochs=10, grad_checkpointing=False, mixed_precision="no", workers=0, save_every=250)


def parse_args(argv=None):
    p = runs.argument_parser("sft.py", __doc__.split("\n")[0])
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    # model
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct",
                   help="initial weights: a hub name, a folder (e.g. OUT/final), or 'tiny' (random, in-process)")
    p.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS,
                   help="max LLM tokens per frame (paper: 128, i.e. max_pixels = 128·28·28)")
    p.add_argument("--train-vision", action="store_true",
                   help="also train the vision encoder (paper: frozen; the merger is always trained)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (paper: on; a 10k-token dialogue needs it at 3B)")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default=None,
                   help="bf16 autocast over fp32 master weights (paper: bf16; default: bf16 on GPU, no on CPU)")
    # data
    p.add_argument("--data", nargs="+", default=None, type=path,
                   help="SFT JSONL files: proactive dialogues (ours or released) + an optional offline mix")
    p.add_argument("--max-tokens", type=int, default=10_000, help="truncate each dialogue to this many tokens (paper: 10,000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding videos ahead of the GPU (0: in-process)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data shuffle and of torch")
    # optimisation. The batch per device is 1 dialogue (the paper's) and not a flag: a larger micro-batch would need
    # padded 3-D rope positions; --grad-accum makes the batch larger
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (paper: 1e-5)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up linearly (paper: 5%%)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (paper: 1)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps to run; 0 = epochs × steps per epoch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches (of 1 dialogue) per optimizer step per rank (paper: 2)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (HF Trainer default: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (HF Trainer default: 1.0)")
    # output
    p.add_argument("--out", default="runs/sft", type=path, help="folder for checkpoints and metrics.jsonl")
    p.add_argument("--save-every", type=int, default=500, help="save OUT/step-N every this many steps (0: only OUT/final)")
    p.add_argument("--keep", type=int, default=2, help="keep the last K step checkpoints, delete older ones (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUT/step-N (weights, optimizer, schedule, RNG)")
    p.add_argument("--toy", action="store_true", help=runs.preset_help(TOY))
    args = runs.parse_with_preset(p, TOY, argv)
    for bad, message in ((not args.data, "--data is required (or --toy)"),
                         (args.grad_accum < 1 or args.epochs < 1 or args.max_steps < 0,
                          "--grad-accum and --epochs must be >= 1, --max-steps >= 0"),
                         (not 0 < args.lr < 1 or not 0 <= args.warmup < 1 or args.grad_clip <= 0,
                          "--lr must be in (0, 1), --warmup in [0, 1), --grad-clip > 0"),
                         (args.max_tokens < 1 or args.frame_tokens < 4, "--max-tokens must be >= 1, --frame-tokens >= 4"),
                         (min(args.workers, args.save_every, args.keep) < 0, "--workers, --save-every, --keep must be >= 0")):
        if bad:
            p.error(message)
    return args


def read_records(paths, toy=False):
    """Every line of every SFT file, checked now, before the model loads, so that bad data never stops a run
    part-way: [(file, line, record)]. Each record's frames are checked too (mmduet2.check_dialogue: images
    vs placeholders, files there, videos long enough); the first bad line is named, with how many more."""
    records, bad, durations = [], [], {}  # durations: each video's length, read once
    try:
        for path in paths:
            for line_no, rec in mmduet2.read_jsonl(path):  # raises "FILE:LINE: malformed JSON (...)"
                if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not ("video" in rec or "images" in rec):
                    raise ValueError(f"{path}:{line_no}: not an SFT dialogue (needs 'messages' and 'video' or 'images')")
                try:
                    mmduet2.check_dialogue(rec, os.path.dirname(path), durations)
                except ValueError as e:
                    bad.append(f"{path}:{line_no}: {e}")
                records.append((path, line_no, rec))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sft.py: {e}" + (" (make the toy world first: python data.py toy --out data/toy)" if toy else ""))
    if bad:  # all of them counted: one fix of the data, not one rerun per line
        more = f" (and {len(bad) - 1} more bad line{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
        raise SystemExit(f"sft.py: {bad[0]}{more}: fix the data; nothing was trained")
    return records


# ----------------------------------------------------------------------------------------------


def training_plan(n, args, total_steps, steps_per_epoch, rank, world):
    """This rank's example indices in training order, epoch after epoch: one seeded permutation per epoch, the same
    on every rank, of which rank r takes every world-th. So 1 rank × accumulation 2 and 2 ranks × accumulation 1
    see the same pairs per step. The ragged tail (at most world × accumulation − 1 examples) is dropped: every rank
    takes the same steps."""
    plan = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        order = list(range(n))
        random.Random(args.seed + epoch).shuffle(order)
        plan += order[rank::world][:steps_per_epoch * args.grad_accum]
    return plan


def main(argv=None):
    from transformers import get_cosine_schedule_with_warmup
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    if args.toy and not cuda:  # the toy's numbers on any machine: torch's float sums depend on its thread count
        torch.set_num_threads(1)  # (docs/toy.md); on 2 cores one thread is also the faster, 653 s against 903 s

    # -- Setup. DDP through accelerate (runs.accelerator), not the paper's DeepSpeed ZeRO-3: a full replica fits an
    # 80 GB card at 3B (docs/full-scale.md), and DeepSpeed would run gradient accumulation inside its engine, against
    # our loop. step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per rank.
    # find_unused_parameters: a dialogue without frames (offline text-only data) leaves the vision merger without a
    # gradient on its rank; DDP then has to know, or the ranks reduce different sets of gradients and crash. It costs
    # one walk of the autograd graph per optimizer step, and makes DDP say once per rank that a step had no unused
    # parameter (expected: most dialogues have frames).
    acc = runs.accelerator("sft.py", args.out, args.mixed_precision, find_unused_parameters=True,
                           step_scheduler_with_optimizer=False)
    rank, world, device, print0 = acc.process_index, acc.num_processes, acc.device, acc.print
    torch.manual_seed(args.seed)

    # -- Data: checked whole before the model loads, then this rank's order (training_plan)
    with runs.said_once(acc):
        records = read_records(args.data, args.toy)
        steps_per_epoch = len(records) // (world * args.grad_accum)
        if steps_per_epoch == 0:
            raise SystemExit(f"sft.py: {len(records)} examples cannot fill one step of {world} ranks × {args.grad_accum} accumulation")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    plan = training_plan(len(records), args, total_steps, steps_per_epoch, rank, world)
    # a resume must find the same order and schedule: the step alone then says where the run was
    # the data by content: the same files under another spelling of their path are the same run, changed ones not
    settings = {k: getattr(args, k) for k in ("seed", "grad_accum", "max_tokens")} | {
        "data_sha256": [runs.file_digest(p) for p in args.data], "world": world, "total_steps": total_steps}
    ckpt, start_step = runs.start_run(args.out, args.resume, settings, acc.is_main_process)

    def encode_example(i):
        """Record i → a Chunk (ids, image pixels, loss mask). Runs in a DataLoader worker."""
        path, line_no, rec = records[i]
        try:
            messages, frames = mmduet2.load_dialogue(rec, root=os.path.dirname(path))
            # truncation keeps the first tokens and drops an image cut in half (ours: mmduet2.truncate)
            chunk = mmduet2.encode_dialogue(processor, messages, frames, max_tokens=args.max_tokens)
        except Exception as e:  # a missing video, an unreadable frame...: say which line of which file
            raise ValueError(f"{path}:{line_no}: {type(e).__name__}: {e}") from None
        if not any(chunk.mask):
            raise ValueError(f"{path}:{line_no}: no assistant token left after truncation to {args.max_tokens} tokens")
        return chunk

    # -- Model: fp32 master weights, which are also the optimizer's; bf16 compute comes from autocast (the paper's bf16
    # under ZeRO keeps bf16 weights plus an fp32 master copy: the same 16 bytes per trained parameter)
    try:
        model, processor = mmduet2.load_model(args.model, dtype=torch.float32, device=device,
                                              frame_tokens=args.frame_tokens)
    except (OSError, FileNotFoundError) as e:
        raise SystemExit(f"sft.py: {e}")
    trained = runs.trainable(model, args.grad_checkpointing, args.train_vision)  # frozen vision, gradients for DDP
    model.config.use_cache = False
    model.train()  # load_model returns eval mode
    # fused AdamW on a GPU: one kernel, none of foreach's temporary copies of the parameters. Betas, weight decay 0 and
    # clipping 1.0 are HF Trainer's defaults, assumed: neither the paper nor the settings we have state them
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=cuda)
    warmup_steps = math.ceil(args.warmup * total_steps)  # HF Trainer rounds the warm-up up too
    # linear warm-up, then cosine decay to 0 at the last step (the released script's schedule)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    wrapped, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if ckpt:
        acc.load_state(os.path.join(ckpt, "state"))  # weights, optimizer, schedule, every rank's RNG
        print0(f"resumed from {ckpt} at step {start_step}")
    n_trained = sum(p.numel() for p in trained)
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trained
    print0(f"{world} rank(s) on {device}, {args.mixed_precision} precision; {len(records)} examples in {len(args.data)} "
           f"file(s); {steps_per_epoch} steps/epoch × {args.grad_accum} accumulation × {world} ranks; {total_steps} "
           f"steps, {warmup_steps} warm-up, cosine decay, peak lr {args.lr:g}; {n_trained / 1e6:.1f}M "
           f"parameters trained, {n_frozen / 1e6:.1f}M frozen (per-GPU memory at 3B: python tools/bench.py memory)")

    # -- Loop: one optimizer step = grad_accum dialogues per rank. batch_size=None: each plan entry goes through
    # encode_example on its own (one dialogue per micro-batch). Resuming at step s skips the s × grad_accum
    # dialogues this rank already trained on. Workers are forked, so they inherit encode_example and the processor.
    loader = torch.utils.data.DataLoader(plan[start_step * args.grad_accum:total_steps * args.grad_accum],
                                         batch_size=None, collate_fn=encode_example, num_workers=args.workers,
                                         multiprocessing_context="fork" if args.workers else None)
    batches = iter(loader)
    metrics = os.path.join(args.out, "metrics.jsonl")
    t_start = time.time()
    bar = tqdm(total=total_steps, initial=start_step, disable=not acc.is_main_process, desc="sft", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        t_step = time.time()
        chunks, error = [], None
        try:
            chunks = [next(batches) for _ in range(args.grad_accum)]
        except ValueError as e:  # "FILE:LINE: what went wrong" (a missing video, an unreadable frame...)
            error = str(e).strip().splitlines()[-1]  # a worker's error carries its traceback
        failure = runs.first_failure(acc, error)  # every rank stops if one failed, not just that one
        if failure:
            bar.close()
            raise SystemExit(f"sft.py: {failure}" if acc.is_main_process else 1)
        if step == start_step and chunks[0].grids and acc.is_main_process:
            _, h, w = chunks[0].grids[0]
            bar.write(f"tokens per frame: {h * w // 4} ({h * 14}×{w * 14} px after resizing; cap {args.frame_tokens})")

        # The normaliser: supervised tokens of the whole step, on every rank. Each micro-batch's summed loss is
        # divided by it and multiplied by world, because DDP averages (not sums) gradients over ranks; the step's
        # gradient is then exactly that of −Σ log p / N_global (the paper does not say how it normalises; a mean of
        # per-example means would weight a short dialogue's tokens more).
        n_local = sum(sum(c.mask) for c in chunks)
        n_global = int(acc.reduce(torch.tensor(n_local, device=device), "sum"))
        loss_sum = 0.0  # Σ −log p over this rank's micro-batches, for the log
        for i, chunk in enumerate(chunks):
            # Gradients are all-reduced only in the last backward of the step (DDP's no_sync before it).
            with nullcontext() if i == len(chunks) - 1 else acc.no_sync(wrapped):
                # log p of the supervised tokens, one forward over the whole dialogue. The mask (from
                # mmduet2.encode_assistant): 1 on each assistant text + its <|im_end|>, NO REPLY turns too;
                # 0 on the system prompt, user turns, frames and the <|im_start|>assistant header.
                # wrapped=...: the forward must go through the DDP wrapper, whose forward arms the gradient
                # all-reduce; calling the bare model silently leaves the ranks unsynchronised.
                logp = mmduet2.forward_logprobs(model, chunk, wrapped=wrapped)  # (n_supervised,)
                acc.backward(-logp.sum() * world / max(n_global, 1))
            loss_sum -= logp.sum().item()
        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), args.grad_clip)  # frozen params have no grad
        lr = scheduler.get_last_lr()[0]  # the lr this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=False)  # zeroed in place: they stay DDP's bucket views (see the model setup)

        # Log: the step's loss per supervised token over all ranks, and throughput in all tokens.
        totals = acc.reduce(torch.tensor([loss_sum, sum(len(c.ids) for c in chunks)], device=device,
                                         dtype=torch.float64), "sum")
        row = {"step": step + 1, "loss": totals[0].item() / max(n_global, 1), "tokens": n_global, "lr": lr,
               "grad_norm": float(grad_norm), "tokens_per_s": totals[1].item() / (time.time() - t_step),
               "elapsed_s": round(time.time() - t_start, 2)}
        if acc.is_main_process:
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
        if args.save_every and (step + 1) % args.save_every == 0:
            runs.save_checkpoint(acc, wrapped, processor, args.out, f"step-{step + 1:06d}", step + 1, settings, args.keep)
    bar.close()

    # -- Save
    runs.save_checkpoint(acc, wrapped, processor, args.out, "final", total_steps, settings)
    print0(f"saved {os.path.join(args.out, 'final')} after {total_steps} steps ({time.time() - t_start:.0f} s)")
    acc.end_training()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(f"sft.py: interrupted; {runs.resume_hint(parse_args().out)}", file=sys.stderr)
        sys.exit(130)
