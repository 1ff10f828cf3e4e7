"""Multi-turn GRPO with the MMDuet2 reward: teach a proactive model to reply early, without reply-time labels.

Pipeline:  data.py ──▶ sft.py ──▶ **grpo.py** ──▶ infer.py ──▶ reward.py eval          (paper Sec. 4.3)

One step, on every rank:
  1. Episodes (Sec. 4.3.3): a short segment of a held-out video (20 s in the released configs). The
     dialogue before it is given as context with the *gold* replies (placed at the end of their
     spans, as in SFT); the policy must answer every user turn of the segment.
  2. Rollouts: the context is encoded once into a KV cache, copied into a batch of G = 4 rows, and
     the rows stream the segment together (one forward per turn and per decoding step for all of
     them) with temperature 1.2, top-k 10, at most 100 new tokens per turn. Each
     rollout keeps the exact ids it sampled and a mask over everything it generated (NO REPLY too).
  3. Reward: reward.mmduet2_reward = 3·PAUC + 2·rep + 0.5·in_span + 2·prefix per rollout (judge
     calls run concurrently). No reply time is ever given: PAUC pays for being right *and* early.
  4. Advantage: rewards are gathered from all ranks, then normalised within each group:
     A = (r − mean_group) / (std_group + ε), one number per rollout, broadcast to its tokens.
  5. Update: the clipped-ratio policy loss on every generated token, averaged over all generated
     tokens of the step on all ranks; one optimizer step per rollout batch (no KL, as released).

Run it:
    accelerate launch grpo.py --toy --init runs/sft-toy/final                       # CPU, the toy world
    accelerate launch --multi_gpu --num_processes 2 grpo.py --toy --init ...         # 2 CPU ranks (gloo)
    accelerate launch --num_processes 8 grpo.py --init runs/sft/final \\
        --anno rl/anno.json --videos rl/videos --judge openai --out runs/grpo        # full scale, 8 GPUs

Departures from the paper / released code (verl + SGLang):
  1. Rollouts run on our own KV-cached streaming engine in plain PyTorch, not on SGLang: the group's
     G rollouts share one encoded context and are decoded as one batch (mmduet2.Group).
  2. Each group lives on one rank (so it can share that cache); rewards are still all-gathered
     before normalising, so the statistics and logged metrics are global.
  3. Loss aggregation: a token-level mean over all generated tokens of the step (every rank), not a
     mean of per-sequence means (`--loss-agg seq` gives the latter); see `policy_loss`.
  4. Episodes are drawn so that the segment contains the start of a randomly chosen gold reply span,
     and never reach past `--max-frames` (the released cap: 90 frames).
  5. Episodes come from a ProactiveVideoQA-format anno.json (what data.py writes), not from the
     released RL parquet files.
"""
import argparse
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
from tqdm import tqdm

import mmduet2
import reward

# ----------------------------------------------------------------------------
# The math: pure functions, tested by hand in tests/test_grpo.py


def group_advantages(rewards, eps=1e-4):
    """A = (r − group mean) / (group std + eps), per row of a (groups, G) tensor.

    std is the unbiased one (torch default, as in TRL). A group whose rewards are all equal
    gets A = 0 everywhere: it carries no signal about which rollout was better.
        [[1, 2, 3, 4]] → mean 2.5, std 1.291 → [[-1.162, -0.387, 0.387, 1.162]]
        [[2, 2, 2, 2]] → [[0, 0, 0, 0]]
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def policy_loss(logp, old_logp, adv, clip=0.2, ref_logp=None, kl_coef=0.0):
    """Per-token clipped surrogate loss (PPO/GRPO), plus an optional k3 KL to a reference.

    logp, old_logp, ref_logp: (T,) log-probs of the generated tokens; adv: scalar or (T,).
        ratio = exp(logp − old_logp)
        loss_t = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1)
    On-policy (one update per batch) old_logp = logp.detach(): ratio = 1, so the loss *value* is −A
    per token while its gradient is −A·∇log p: the REINFORCE gradient with a group baseline.
    Worked example: A = 1, logp − old = log 1.5 (ratio 1.5): unclipped 1.5, clipped 1.2 → loss −1.2.
    Returns (per-token loss (T,), clipped (T,) bool).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    loss = -torch.min(unclipped, clipped)
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        loss = loss + kl_coef * (torch.exp(d) - d - 1)  # k3: unbiased, always >= 0
    return loss, clipped < unclipped


# ----------------------------------------------------------------------------
# Episodes and rollouts


def make_episode(example, video_dir, args, rng):
    """A segment of one annotated video: its context turns (with gold replies) and its rollout turns.

    Returns a dict with the frames per turn, the user text per turn, the turn times, the index of
    the first rollout turn, the gold answers the segment is scored on and the replies in context.
    """
    frames = []
    for _, frame in mmduet2.read_frames(os.path.join(video_dir, example["video"]), args.interval):
        if len(frames) == args.max_frames:
            break
        frames.append(frame)
    times = mmduet2.turn_times(len(frames), args.interval, args.frames_per_turn)
    texts = [None] * len(times)
    for turn in example["conversation"]:  # the question at t=0, later questions/subtitles at their time
        if turn["role"] == "user":
            j = next((j for j, t in enumerate(times) if t >= turn["time"]), None)
            if j is not None:
                texts[j] = turn["content"] if texts[j] is None else texts[j] + " " + turn["content"]
    question = example["conversation"][0]["content"]
    answers = [dict(a, question=a.get("question", question)) for a in example["answer"]]
    # Pick a gold span and a segment that contains its start: every episode has something to say.
    n_seg = max(1, round(args.segment / (args.interval * args.frames_per_turn)))  # rollout turns
    reachable = [a for a in answers if a["reply_timespan"][0] <= times[-1]]
    target = rng.choice(reachable) if reachable else None
    j_target = next(j for j, t in enumerate(times) if t >= target["reply_timespan"][0]) if target else 0
    start = rng.randint(max(0, j_target - n_seg + 1), max(0, min(j_target, len(times) - n_seg)))
    end = min(start + n_seg, len(times))
    # Context replies: the gold answers SFT would have placed before the segment (end of their span).
    placed = {}
    for a in answers:
        j = mmduet2.reply_turn(times, a["reply_timespan"])
        if j is not None and j < start:
            placed[j] = placed.get(j, []) + [a["content"]]
    context_replies = [" ".join(placed[j]) for j in sorted(placed)]
    scored = [a for a in answers if a["content"] not in sum(placed.values(), [])]
    return dict(frames=frames, times=times, texts=texts, start=start, end=end, placed=placed,
                answers=scored, context_replies=context_replies, question_id=example["question_id"])


def turn_frames(ep, j, fpt):
    return ep["frames"][j * fpt:(j + 1) * fpt]


@torch.no_grad()
def rollouts(model, processor, ep, args):
    """G streams of one episode: the context encoded once, then the G rollouts decoded as one batch.

    Returns a list of (Stream, [(time, text)] of the rollout turns, log-probs); each Stream's `seq`
    holds the exact ids, with mask = 1 on what this rollout generated.
    """
    base = mmduet2.Stream(model, processor)
    fpt = args.frames_per_turn
    for j in range(ep["start"]):
        base.feed(ep["texts"][j], turn_frames(ep, j, fpt))
        base.feed(" ".join(ep["placed"][j]) if j in ep["placed"] else mmduet2.SILENCE, role="assistant")
    group = mmduet2.Group(base, args.group)  # the shared context is encoded here, once
    turns, logps = [[] for _ in range(args.group)], [[] for _ in range(args.group)]
    config = mmduet2.decoding(processor, args.temperature, args.top_k, args.max_new_tokens)
    for j in range(ep["start"], ep["end"]):
        replies = group.turn(turn_frames(ep, j, fpt), ep["texts"][j], config)
        for b, r in enumerate(replies):
            turns[b].append((ep["times"][j], r.text))
            logps[b] += r.logprobs
    return [(row, t, torch.tensor(lp)) for row, t, lp in zip(group.rows, turns, logps)]


def reply_delays(turns, answers):
    """Seconds from each gold span start to the first reply inside the span (a diagnostic)."""
    delays = []
    for a in answers:
        s0, s1 = a["reply_timespan"]
        hits = [t for t, text in turns if s0 <= t <= s1 and not mmduet2.is_silent(text)]
        if hits:
            delays.append(hits[0] - s0)
    return delays


# ----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and data
    p.add_argument("--init", default="runs/sft/final", help="SFT checkpoint folder (or 'tiny' for a smoke run)")
    p.add_argument("--anno", default="rl/anno.json", help="held-out RL videos' gold answers (ProactiveVideoQA format)")
    p.add_argument("--videos", default=None, help="folder of the videos named in --anno (default: ANNO's folder/videos)")
    p.add_argument("--out", default="runs/grpo", help="checkpoints and metrics.jsonl go here")
    p.add_argument("--toy", action="store_true", help="CPU preset for the toy world (see TOY below)")
    # episodes (Sec. 4.3.3)
    p.add_argument("--segment", type=float, default=20.0, help="seconds of video the policy answers per episode")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    p.add_argument("--frames-per-turn", type=int, default=2, help="frames per user turn")
    p.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS, help="LLM tokens per frame")
    p.add_argument("--max-frames", type=int, default=90, help="frames read per video (context + segment)")
    # rollouts
    p.add_argument("--group", type=int, default=4, help="rollouts per episode (G)")
    p.add_argument("--episodes", type=int, default=1, help="episodes per rank per step")
    p.add_argument("--temperature", type=float, default=1.2, help="rollout sampling temperature")
    p.add_argument("--top-k", type=int, default=10, help="rollout top-k")
    p.add_argument("--max-new-tokens", type=int, default=100, help="max new tokens per assistant turn")
    # reward
    p.add_argument("--judge", choices=["offline", "openai"], default="openai", help="reward judge")
    p.add_argument("--judge-model", default=None, help="judge model (default: $JUDGE_MODEL)")
    p.add_argument("--judge-workers", type=int, default=16, help="judge requests in flight")
    p.add_argument("--weights", type=float, nargs=4, default=[3, 2, 0.5, 2], metavar=("PAUC", "REP", "IN_SPAN", "PFX"),
                   help="reward weights (Eq. 2); Table 6 ablations set one to 0")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the RL videos")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = the epochs)")
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range ε")
    p.add_argument("--inner-epochs", type=int, default=1, help="updates per rollout batch (1 = on-policy)")
    p.add_argument("--kl", type=float, default=0.0, help="k3 KL coefficient to the frozen initial model (0 = released)")
    p.add_argument("--loss-agg", choices=["token", "seq"], default="token", help="mean over all tokens, or of per-rollout means")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the training pass (rollouts are unaffected)")
    # running it
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=2, help="keep the last K step checkpoints (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="episode order and sampling seed")
    args = p.parse_args(argv)
    if args.toy:  # TOY: the tiny model on the toy world, a few minutes on a laptop CPU
        # the paper's frame settings (2 s, 2 frames per turn, 20 s segments) on the toy data, but a
        # tiny model needs a larger step than 1e-6 (3e-4 broke its wording: README results),
        # 8 passes over the RL videos (400 steps), and toy replies are short
        defaults = dict(init="runs/sft-toy/final", anno="data/toy/rl/anno.json", out="runs/grpo-toy", judge="offline",
                        lr=3e-5, epochs=8, max_new_tokens=16, grad_checkpointing=False, episodes=2, save_every=50)
        for k, v in defaults.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.videos = args.videos or os.path.join(os.path.dirname(args.anno), "videos")
    return args


def save(model, processor, optimizer, step, out, keep=2):
    """model + processor + optimizer state into out/step-N, written to a temp folder then renamed;
    then all but the last `keep` step folders are deleted (0: keep all)."""
    final, tmp = os.path.join(out, f"step-{step}"), os.path.join(out, f".tmp-step-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    # no RNG state: every step's randomness is seeded from (seed, step, rank), so a resume replays it
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    steps = sorted(int(d[5:]) for d in os.listdir(out) if d.startswith("step-"))
    for old in steps[:-keep] if keep else []:
        shutil.rmtree(os.path.join(out, f"step-{old}"))


def last_checkpoint(out):
    steps = [int(d[5:]) for d in os.listdir(out) if d.startswith("step-")] if os.path.isdir(out) else []
    return os.path.join(out, f"step-{max(steps)}") if steps else None


def main(argv=None):
    from accelerate import Accelerator
    args = parse_args(argv)
    # cpu=True on a machine without GPU: otherwise `--multi_gpu` ranks run unsynchronised (streaming.md)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    print0 = acc.print
    rank, world = acc.process_index, acc.num_processes

    # -- model: the policy (and, only with --kl, a frozen reference) -----------------------------
    ckpt = last_checkpoint(args.out) if args.resume else None
    model, processor = mmduet2.load_model(ckpt or args.init, device=acc.device, frame_tokens=args.frame_tokens)
    ref = mmduet2.load_model(args.init, device=acc.device)[0].requires_grad_(False) if args.kl else None
    if args.grad_checkpointing:
        model.activation_checkpointing_enable()  # active only in train mode: the update, not the rollouts
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    wrapped, optimizer = acc.prepare(model, optimizer)
    step = 0
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print0(f"resumed from {ckpt} at step {step}")

    # -- data: every rank shuffles the same list and takes its own episodes ----------------------
    examples = mmduet2.load_anno(args.anno)
    per_step = args.episodes * world
    steps_total = args.max_steps or args.epochs * len(examples) // per_step
    if steps_total == 0:
        raise SystemExit(f"grpo.py: {len(examples)} examples cannot fill one step of {per_step} episodes")
    judge = reward.OfflineJudge() if args.judge == "offline" else reward.OpenAIJudge(
        model=args.judge_model, max_workers=args.judge_workers)
    missing = [ex["video"] for ex in examples if not os.path.isfile(os.path.join(args.videos, ex["video"]))]
    if missing:  # checked up front: a rank failing mid-run would leave the others waiting in a collective
        raise SystemExit(f"grpo.py: {len(missing)} videos missing in {args.videos}, e.g. {missing[0]}")
    h, w = next(mmduet2.read_frames(os.path.join(args.videos, examples[0]["video"]), args.interval))[1].shape[:2]
    print0(f"{len(examples)} videos, {steps_total} steps of {per_step} episodes x {args.group} rollouts, "
           f"{mmduet2.frame_tokens(h, w, args.frame_tokens)} tokens per frame, {world} rank(s)")
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if acc.is_main_process else None

    bar = tqdm(total=steps_total, initial=step, disable=not acc.is_main_process, desc="grpo")
    while step < steps_total:
        t0 = time.time()
        # episodes of this step: a fixed permutation per epoch, so a resumed run sees the same ones
        epoch, k = divmod(step * per_step, len(examples))
        order = list(range(len(examples)))
        random.Random(args.seed + epoch).shuffle(order)
        rng = random.Random(args.seed * 1_000_003 + step * world + rank)
        torch.manual_seed(rng.randrange(2**62))  # sampling draws from torch's default generators (mmduet2)
        mine = [examples[order[(k + rank * args.episodes + e) % len(examples)]] for e in range(args.episodes)]

        # 1-2. rollouts (no collective call in here: ranks proceed at their own pace)
        model.eval()
        episodes, groups = [], []
        for ex in mine:
            ep = make_episode(ex, args.videos, args, rng)
            episodes.append(ep)
            groups.append(rollouts(model, processor, ep, args))
        t_roll = time.time()

        # 3. rewards, all rollouts of this rank at once (the judge runs them concurrently)
        jobs = [(turns, ep["answers"], ep["context_replies"]) for ep, g in zip(episodes, groups) for _, turns, _ in g]
        calls0, fail0 = judge.calls, judge.failures
        with ThreadPoolExecutor(max(1, getattr(judge, "max_workers", 1))) as pool:
            parts = list(pool.map(lambda j: reward.mmduet2_reward(*j[:2], judge, j[2], weights=tuple(args.weights)), jobs))
        t_judge = time.time()

        # 4. advantages: gather every rank's rewards first, normalise per group, keep our rows
        local = torch.tensor([p["total"] for p in parts], dtype=torch.float32).view(args.episodes, args.group)
        everything = acc.gather(local.to(acc.device)).cpu()  # (world·episodes, G), rank-major
        adv = group_advantages(everything)[rank * args.episodes:(rank + 1) * args.episodes].flatten()

        # 5. update: token-level mean over all generated tokens of the step, on all ranks
        streams = [(s, lp) for g in groups for s, _, lp in g]
        n_local = sum(len(lp) for _, lp in streams)
        n_global = acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item()
        model.train()
        old = [None] * len(streams)
        clipped = total_loss = 0.0
        for _ in range(args.inner_epochs):
            for i, ((s, _), a) in enumerate(zip(streams, adv)):
                last = i == len(streams) - 1
                with acc.no_sync(wrapped) if not last else nullcontext():  # one gradient all-reduce per step
                    logp = mmduet2.forward_logprobs(model, s.seq, args.temperature, wrapped=wrapped)
                    if old[i] is None:  # on-policy: the detached current log-probs (ratio = 1)
                        old[i] = logp.detach()
                    ref_logp = mmduet2.forward_logprobs(ref, s.seq, args.temperature).detach() if ref else None
                    loss_t, clip_t = policy_loss(logp, old[i], a.to(logp.device), args.clip, ref_logp, args.kl)
                    # token mean over the global count; DDP averages gradients over ranks, hence × world
                    denom = n_global / world if args.loss_agg == "token" else len(streams) * len(logp)
                    loss = loss_t.sum() / denom
                    acc.backward(loss)
                clipped += clip_t.sum().item()
                total_loss += loss.item()
            grad_norm = acc.clip_grad_norm_(wrapped.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        t_end = time.time()

        # -- metrics: global where it matters (reward statistics), this rank's otherwise -----------
        comps = {key: torch.tensor([p[key] for p in parts]) for key in ("pauc", "rep", "in_span", "prefix")}
        turns_all = [turns for g in groups for _, turns, _ in g]
        delays = [d for ep, g in zip(episodes, groups) for _, turns, _ in g for d in reply_delays(turns, ep["answers"])]
        m = dict(step=step, reward=everything.mean().item(), reward_std=everything.std(-1).mean().item(),
                 frac_reward_zero_std=(everything.std(-1) < 1e-6).float().mean().item(),
                 **{f"{k}": v.mean().item() for k, v in comps.items()},
                 **{f"{k}_std": v.std().item() for k, v in comps.items()},
                 replies_per_rollout=sum(not mmduet2.is_silent(t) for ts in turns_all for _, t in ts) / len(turns_all),
                 reply_delay=sum(delays) / len(delays) if delays else None,
                 judge_calls=judge.calls - calls0, judge_failures=judge.failures - fail0,
                 clip_ratio=clipped / max(1, n_local * args.inner_epochs), loss=total_loss, grad_norm=float(grad_norm),
                 tokens=n_global, tokens_per_s=n_global / (t_end - t0), time_rollout=t_roll - t0,
                 time_judge=t_judge - t_roll, time_update=t_end - t_judge)
        if log:
            log.write(json.dumps(m) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.3f}", replies=f"{m['replies_per_rollout']:.2f}")
        if step % args.save_every == 0 or step == steps_total:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save(acc.unwrap_model(wrapped), processor, optimizer, step, args.out, args.keep)
    bar.close()
    if acc.is_main_process:
        final = os.path.join(args.out, "final")
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(last_checkpoint(args.out), final, ignore=shutil.ignore_patterns("trainer.pt"))
        print0(f"saved {final}")
    acc.wait_for_everyone()
    return dict(model=model, rewards=everything, advantages=adv)  # the last step, for tests


if __name__ == "__main__":
    main()
