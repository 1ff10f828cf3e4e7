"""SFT: teach Qwen2.5-VL to watch a stream and answer every turn, with a reply or NO REPLY (paper Sec. 4.2).

Role in the pipeline: the second step.

    data.py ──▶ sft.jsonl ──sft.py──▶ SFT checkpoint ──grpo.py──▶ RL checkpoint ──infer.py

One training example is one whole dialogue (our SFT JSONL from data.py, or the released
MMDuet2-data SFT JSONL, plus any offline JSONL in the same format): a system prompt, then user turns
that each bring 1–2 frames (+ maybe a question or a subtitle), each followed by the assistant's
answer or exactly "NO REPLY". mmduet2.encode_dialogue renders it with Qwen's chat template (frames
resized to at most --frame-tokens LLM tokens) and gives the loss mask; we train by teacher forcing:

    loss = − Σ log p(supervised token) / (supervised tokens in the whole optimizer step, all ranks)

Supervised = every assistant text + its <|im_end|>, NO REPLY turns included: staying silent is a
decision the model must learn (most turns are silent, which is why SFT alone replies rarely, Sec. 4.3).

Run it:

    # the toy world on 1 CPU (tiny random model; ~8 min for 4,000 steps): data first, then SFT
    python data.py toy --out data/toy --n-train 400 --n-rl 100 --nqna-frac 0 && OMP_NUM_THREADS=1 python sft.py --toy
    # 2 CPU ranks (gloo DDP; tests/test_sft.py checks that they stay in sync)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no sft.py --toy
    # 1 GPU, the released recipe (download Qwen/Qwen2.5-VL-3B-Instruct first when offline)
    python sft.py --data data/web/sft.jsonl data/offline/llava.jsonl data/offline/tarsier2.jsonl --out runs/sft
    # N GPUs on one node (DDP; ~49 GiB of weights+grads+Adam per GPU at 3B, see README);
    # --grad-accum 4 keeps the paper's global batch of 32 dialogues (16 GPUs × 2) on 8 GPUs
    accelerate launch --multi_gpu --num_processes 8 sft.py --data ... --out runs/sft --grad-accum 4
    # 16 GPUs on 2 nodes, sharded like the paper's ZeRO-3 (fsdp.yaml in the README), on node R = 0, 1
    accelerate launch --config_file fsdp.yaml --machine_rank R --main_process_ip HOST sft.py --data ...
    # an interrupted run: the same command + --resume (it continues from OUT/step-N)

Output: OUT/step-NNNNNN/ every --save-every steps (the model + processor, loadable by
`mmduet2.load_model(folder)` / `infer.py --model folder`, plus state/ for --resume), OUT/final/,
and OUT/metrics.jsonl (one line per optimizer step: loss, tokens, lr, tokens/s, elapsed).

Where we depart from the paper and its released script:

1. DDP (or FSDP) through accelerate, not DeepSpeed ZeRO-3: accelerate hands gradient accumulation
   to DeepSpeed's engine, which would fight our explicit accumulation loop. FSDP FULL_SHARD shards
   the same three things (weights, gradients, Adam states) as ZeRO-3.
2. bf16 as autocast over fp32 weights, which are also the optimizer's master copy (ZeRO's bf16
   mode keeps bf16 weights plus an fp32 master copy: the same 16 bytes per trained parameter).
3. The loss is normalised by the global count of supervised tokens of the optimizer step (the
   paper does not say; a mean of per-example means would weight a short dialogue's tokens more).
4. Per-device batch is 1 (the paper's value) and is not a flag: a larger micro-batch needs padding
   of 3-D rope positions; use --grad-accum for a larger batch.
5. Each epoch drops the examples that do not fill a whole optimizer step on every rank (at most
   world × accumulation − 1), so all ranks take the same number of steps.
6. Gradient clipping 1.0, weight decay 0, AdamW betas (0.9, 0.999): HF Trainer's defaults, assumed;
   neither the paper nor the settings we have state them. Decay: cosine, as the released script.
7. Truncation at --max-tokens keeps the first tokens and drops an image cut in half (mmduet2.truncate).
8. A malformed data line is fatal, reported as FILE:LINE: checked for every file at start-up (so
   nothing is lost), and videos/frames when first read.
9. --toy (values in TOY below): the random 0.6M-parameter "tiny" model on data/toy/train/sft.jsonl,
   lr 2e-3 (a random init needs a large step), 20 epochs (4,000 steps on 400 toy videos), fp32, no
   gradient checkpointing, no DataLoader workers, a checkpoint every 250 steps, runs/sft-toy.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import mmduet2

# ----------------------------------------------------------------------------------------------
# Arguments (defaults = the released recipe; --toy = a CPU-sized run)

parser = argparse.ArgumentParser(description="SFT of a proactive streaming video model (MMDuet2 Sec. 4.2)")
# model
parser.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct",
                    help="initial weights: a hub name, a folder (e.g. OUT/final), or 'tiny' (random, in-process)")
parser.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS,
                    help="max LLM tokens per frame (paper: 128, i.e. max_pixels = 128·28·28)")
parser.add_argument("--attn", default=None,
                    help="attention implementation, e.g. flash_attention_2 (default: transformers' choice)")
parser.add_argument("--train-vision", action="store_true",
                    help="also train the vision encoder (paper: frozen; the merger is always trained)")
parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute activations in backward (paper: on; a 10k-token dialogue needs it at 3B)")
parser.add_argument("--mixed-precision", choices=("bf16", "no"),
                    default="bf16" if torch.cuda.is_available() else "no",
                    help="bf16 autocast over fp32 master weights (paper: bf16; default: bf16 on GPU, no on CPU)")
# data
parser.add_argument("--data", nargs="+", default=None,
                    help="SFT JSONL files: proactive dialogues (ours or released) + an optional offline mix")
parser.add_argument("--max-tokens", type=int, default=10_000,
                    help="truncate each dialogue to this many tokens (paper: 10,000)")
parser.add_argument("--workers", type=int, default=2,
                    help="DataLoader processes decoding videos ahead of the GPU (0: in-process)")
parser.add_argument("--seed", type=int, default=0, help="seed of the data shuffle and of torch")
# optimisation
parser.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (paper: 1e-5)")
parser.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                    help="decay after warm-up, to 0 at the last step (released script: cosine)")
parser.add_argument("--warmup", type=float, default=0.05,
                    help="fraction of the steps spent warming up linearly (paper: 5%%)")
parser.add_argument("--epochs", type=int, default=1, help="passes over the data (paper: 1)")
parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps to run; 0 = epochs × steps per epoch")
parser.add_argument("--grad-accum", type=int, default=2,
                    help="micro-batches (of 1 dialogue) per optimizer step per rank (paper: 2)")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (HF Trainer default: 0)")
parser.add_argument("--grad-clip", type=float, default=1.0,
                    help="clip the global gradient norm to this (HF Trainer default: 1.0)")
# output
parser.add_argument("--out", default="runs/sft", help="folder for checkpoints and metrics.jsonl")
parser.add_argument("--save-every", type=int, default=500,
                    help="save OUT/step-N every this many optimizer steps (0: only OUT/final at the end)")
parser.add_argument("--keep", type=int, default=2,
                    help="keep the last K step checkpoints, delete older ones (0: keep all)")
parser.add_argument("--resume", action="store_true",
                    help="continue from the newest OUT/step-N (model, optimizer, scheduler, step, RNG)")
parser.add_argument("--dump-rank-params", action="store_true",
                    help="(tests) each rank saves its weights to OUT/params-rankR.pt, to check DDP kept them equal")
parser.add_argument("--toy", action="store_true",
                    help="the toy-world preset (TOY below); explicit flags still override it")
TOY = dict(model="tiny", data=["data/toy/train/sft.jsonl"], out="runs/sft-toy", lr=2e-3, epochs=20,
           grad_checkpointing=False, mixed_precision="no", workers=0, save_every=250)
if parser.parse_known_args()[0].toy:
    parser.set_defaults(**TOY)  # preset first, then the command line on top of it
args = parser.parse_args()
if not args.data:
    parser.error("--data is required (or --toy)")

# ----------------------------------------------------------------------------------------------
# Setup

# cpu=True is what makes `accelerate launch --multi_gpu` on a CPU machine real gloo DDP: without it
# the ranks run as independent processes and never synchronise (spec/streaming.md, "Multi-process on CPU").
# step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per rank.
accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                          step_scheduler_with_optimizer=False)
rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
is_main = accelerator.is_main_process
print0 = accelerator.print  # prints on rank 0 only
torch.manual_seed(args.seed)
os.makedirs(args.out, exist_ok=True)
ckpts = sorted(glob.glob(os.path.join(args.out, "step-*")))  # complete ones: a half-written one is .tmp-*
if ckpts and not args.resume:  # a new run would mix its checkpoints with the old run's
    sys.exit(f"sft.py: {args.out} holds checkpoints of an earlier run ({os.path.basename(ckpts[-1])}): "
             "pass --resume to continue it, or use another --out (or delete the folder)")

# ----------------------------------------------------------------------------------------------
# Data: index every line of every file now (a bad line fails here, before any training)

records = []  # (file, line number, record) of the whole mixture
try:
    for path in args.data:
        for line_no, rec in mmduet2.read_jsonl(path):  # raises "FILE:LINE: malformed JSON (...)"
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not (
                    "video" in rec or "images" in rec):
                raise ValueError(f"{path}:{line_no}: not an SFT dialogue (needs 'messages' and 'video' or 'images')")
            records.append((path, line_no, rec))
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"sft.py: {e}" + (" (make the toy world first: python data.py toy --out data/toy)" if args.toy else ""))

# Order: one seeded permutation per epoch, the same on every rank; rank r takes every world-th
# example of it. So 1 rank × accumulation 2 and 2 ranks × accumulation 1 see the same pairs per step.
steps_per_epoch = len(records) // (world * args.grad_accum)
if steps_per_epoch == 0:
    sys.exit(f"sft.py: {len(records)} examples cannot fill one step of {world} ranks × {args.grad_accum} accumulation")
total_steps = args.max_steps or args.epochs * steps_per_epoch
plan = []  # this rank's example indices, in training order, epoch after epoch
for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    order = list(range(len(records)))
    random.Random(args.seed + epoch).shuffle(order)
    plan += order[rank::world][:steps_per_epoch * args.grad_accum]  # drop the ragged tail (deviation 5)


def encode_example(i):
    """Record i → a Chunk (ids, image pixels, loss mask). Runs in a DataLoader worker."""
    path, line_no, rec = records[i]
    try:
        messages, frames = mmduet2.load_dialogue(rec, root=os.path.dirname(path))
        chunk = mmduet2.encode_dialogue(processor, messages, frames, max_tokens=args.max_tokens)
    except Exception as e:  # a missing video, an unreadable frame...: say which line of which file
        raise ValueError(f"{path}:{line_no}: {type(e).__name__}: {e}") from None
    if not any(chunk.mask):
        raise ValueError(f"{path}:{line_no}: no assistant token left after truncation to {args.max_tokens} tokens")
    return chunk


# ----------------------------------------------------------------------------------------------
# Model

try:  # fp32 master weights: bf16 compute comes from autocast (deviation 2)
    model, processor = mmduet2.load_model(args.model, dtype=torch.float32, device=device, attn=args.attn,
                                          frame_tokens=args.frame_tokens)
except (OSError, FileNotFoundError) as e:
    sys.exit(f"sft.py: {e}")
# Paper: the vision encoder (patch embedding + ViT blocks) is frozen; the merger, which maps its
# features into the LLM's embedding space, is trained with the whole LLM.
model.model.visual.requires_grad_(args.train_vision)
model.model.visual.merger.requires_grad_(True)
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
if args.grad_checkpointing:  # non-reentrant: works with frozen inputs and with DDP
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
model.train()  # load_model returns eval mode

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                              betas=(0.9, 0.999), weight_decay=args.weight_decay)  # deviation 6: assumed values
warmup_steps = math.ceil(args.warmup * total_steps)  # HF Trainer rounds the warm-up up too
make_schedule = get_cosine_schedule_with_warmup if args.schedule == "cosine" else get_linear_schedule_with_warmup
scheduler = make_schedule(optimizer, warmup_steps, total_steps)
model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
raw = accelerator.unwrap_model(model)  # the HF model itself: rope positions, saving

print0(f"{world} rank(s) on {device}; {len(records)} examples in {len(args.data)} file(s); "
       f"{steps_per_epoch} steps/epoch × {args.grad_accum} accumulation × {world} ranks; {total_steps} steps, "
       f"{warmup_steps} warm-up, {args.schedule} decay, peak lr {args.lr:g}")
# The estimate counts bytes of state per parameter: trained = fp32 weight + fp32 grad + 2 fp32 Adam
# moments (16 B); frozen = fp32 weight (4 B). Activations and buffers come on top.
state_bytes = 16 * n_train + 4 * n_frozen
print0(f"parameters: {n_train / 1e6:.1f}M trained, {n_frozen / 1e6:.1f}M frozen (vision encoder); "
       "weights+grads+AdamW ≈ "
       + (f"{state_bytes / 2**30:.1f} GiB" if state_bytes > 2**30 else f"{state_bytes / 2**20:.0f} MiB")
       + " per GPU (estimate, before activations; FSDP divides it by the number of GPUs)")

# ----------------------------------------------------------------------------------------------
# Resume from the newest complete checkpoint

start_step = 0
if args.resume and ckpts:
    meta = json.load(open(os.path.join(ckpts[-1], "trainer.json")))
    same = {k: getattr(args, k) for k in ("data", "seed", "grad_accum")} | {"world": world, "total_steps": total_steps}
    if {k: meta[k] for k in same} != same:  # another run's data order: the step would not say where we are
        sys.exit(f"sft.py: {ckpts[-1]} was written by a different run ({ {k: meta[k] for k in same} }); "
                 f"cannot resume with {same}")
    accelerator.load_state(os.path.join(ckpts[-1], "state"))  # model, optimizer, scheduler, every rank's RNG
    start_step = meta["step"]
    print0(f"resumed from {ckpts[-1]} at step {start_step}")
elif args.resume:
    print0(f"--resume: no checkpoint in {args.out}, starting from scratch")
metrics_path = os.path.join(args.out, "metrics.jsonl")
if is_main and start_step == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a fresh run starts a fresh log; a resumed one appends


def save_checkpoint(name, step, with_state):
    """Write OUT/name atomically: everything goes to OUT/.tmp-name, then one rename."""
    tmp, dst = os.path.join(args.out, f".tmp-{name}"), os.path.join(args.out, name)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP (gathers the shards)
    if is_main:  # save_pretrained + processor = a folder that mmduet2.load_model / infer.py can open
        raw.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        meta = {k: getattr(args, k) for k in ("data", "seed", "grad_accum", "model", "lr")}
        meta |= {"step": step, "world": world, "total_steps": total_steps,
                 "examples_per_rank": step * args.grad_accum}  # data position: plan[:step × accumulation] done
        json.dump(meta, open(os.path.join(tmp, "trainer.json"), "w"), indent=1)
    if with_state:  # every rank writes its own RNG state into the shared folder
        accelerator.save_state(os.path.join(tmp, "state"), safe_serialization=False)  # pickled like optimizer.bin:
        # safetensors cannot hold the tied embedding/lm_head twice and warns at every save
    accelerator.wait_for_everyone()
    if is_main:
        old_copy = os.path.join(args.out, f".old-{name}")
        if os.path.exists(dst):  # saving the same step again (e.g. after a resume): swap, never leave a gap
            shutil.rmtree(old_copy, ignore_errors=True)
            os.rename(dst, old_copy)
        os.rename(tmp, dst)
        shutil.rmtree(old_copy, ignore_errors=True)
        old = sorted(glob.glob(os.path.join(args.out, "step-*")))
        for path in old[:-args.keep] if args.keep and name.startswith("step-") else []:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Training loop: one optimizer step = grad_accum dialogues per rank

# batch_size=None: each plan entry goes through encode_example on its own (one dialogue per micro-batch).
# Resuming at step s skips the s × grad_accum dialogues this rank already trained on. Workers are
# forked: a flat script would be re-run from the top by every "spawn"ed worker.
loader = torch.utils.data.DataLoader(plan[start_step * args.grad_accum:total_steps * args.grad_accum],
                                     batch_size=None, collate_fn=encode_example, num_workers=args.workers,
                                     multiprocessing_context="fork" if args.workers else None)
batches = iter(loader)
t_start = time.time()
bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not is_main, desc="sft")
for step in bar:
    t_step = time.time()
    try:
        chunks = [next(batches) for _ in range(args.grad_accum)]
    except ValueError as e:  # "FILE:LINE: what went wrong" (a missing video, an unreadable frame...)
        sys.exit(f"sft.py: {str(e).strip().splitlines()[-1]}")  # a worker's error carries its traceback
    if step == start_step and chunks[0].grids:
        t, h, w = chunks[0].grids[0]
        print0(f"tokens per frame: {h * w // 4} ({h * 14}×{w * 14} px after resizing; cap {args.frame_tokens})")

    # The normaliser: supervised tokens of the whole step, on every rank. Each micro-batch's summed
    # loss is divided by it and multiplied by world, because DDP averages (not sums) gradients over
    # ranks; the step's gradient is then exactly that of −Σ log p / N_global (deviation 3).
    n_local = sum(sum(c.mask) for c in chunks)
    n_global = int(accelerator.reduce(torch.tensor(n_local, device=device), "sum"))
    loss_sum = 0.0  # Σ −log p over this rank's micro-batches, for the log
    for i, chunk in enumerate(chunks):
        # Gradients are all-reduced only in the last backward of the step (DDP's no_sync before it).
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            # log p of the supervised tokens, one forward over the whole dialogue. The mask (from
            # mmduet2.encode_assistant): 1 on each assistant text + its <|im_end|>, NO REPLY turns too;
            # 0 on the system prompt, user turns, frames and the <|im_start|>assistant header.
            # wrapped=model: the forward must go through the DDP wrapper, whose forward arms the
            # gradient all-reduce; calling the bare model silently leaves the ranks unsynchronised.
            logp = mmduet2.forward_logprobs(raw, chunk, wrapped=model)  # (n_supervised,)
            loss = -logp.sum() * world / max(n_global, 1)
            accelerator.backward(loss)
        loss_sum -= logp.sum().item()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)  # frozen params have no grad
    lr = scheduler.get_last_lr()[0]  # the lr this step used
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    # Log: the step's loss per supervised token over all ranks, and throughput in all tokens.
    totals = accelerator.reduce(torch.tensor([loss_sum, sum(len(c.ids) for c in chunks)], device=device,
                                             dtype=torch.float64), "sum")
    row = {"step": step + 1, "loss": totals[0].item() / max(n_global, 1), "tokens": n_global,
           "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": totals[1].item() / (time.time() - t_step),
           "elapsed_s": round(time.time() - t_start, 2)}
    if is_main:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
    if args.save_every and (step + 1) % args.save_every == 0:
        save_checkpoint(f"step-{step + 1:06d}", step + 1, with_state=True)

# ----------------------------------------------------------------------------------------------
# Save

save_checkpoint("final", total_steps, with_state=False)
if args.dump_rank_params:  # for the multi-process test: every rank's own view of the weights
    torch.save({"params": {n: p.detach().cpu() for n, p in raw.named_parameters()},
                "examples": ["{}:{}".format(*records[i][:2]) for i in plan[:total_steps * args.grad_accum]]},
               os.path.join(args.out, f"params-rank{rank}.pt"))
print0(f"saved {os.path.join(args.out, 'final')} after {total_steps} steps ({time.time() - t_start:.0f} s)")
accelerator.end_training()
