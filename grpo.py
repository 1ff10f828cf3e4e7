"""Multi-turn GRPO with the MMDuet2 reward: teach a proactive model to reply early, without reply-time labels.

Pipeline:  data.py ──▶ sft.py ──▶ **grpo.py** ──▶ infer.py ──▶ evaluate.py          (paper Sec. 4.3)

SFT puts every reply at the end of its event: the model learns *what* to say but replies late, and no label
says when a fact became visible. GRPO samples G continuations of one stream and prefers those that were right
*and* early, as the PAUC reward measures. One step, on every rank, top to bottom in `main`:
  1. Episodes: a 20 s segment of a held-out video after a context of gold replies (Sec. 4.3.3, `make_episode`).
  2. Rollouts: G = 4 rows answer the segment at T = 1.2, top-k 10, <= 100 new tokens per turn (`rollouts`).
  3. Rewards: 3·PAUC + 2·rep + 0.5·in_span + 2·prefix per rollout (Eq. 2, reward.mmduet2_reward).
  4. Advantages: rewards normalised within each group, gathered from every rank (`group_advantages`).
  5. Update: the clipped-ratio loss on every generated token (`policy_loss`), one optimizer step, no KL.

Run it:
    accelerate launch grpo.py --toy --init runs/sft-toy/final                       # CPU, the toy world (~5 min)
    accelerate launch --multi_gpu --num_processes 2 grpo.py --toy --init ...         # 2 CPU ranks (gloo DDP)
    export OPENAI_BASE_URL=http://judge:8000/v1 OPENAI_API_KEY=EMPTY JUDGE_MODEL=Qwen/Qwen2.5-32B-Instruct
    accelerate launch --multi_gpu --num_processes 8 grpo.py --init runs/sft/final \\
        --anno data/web/rl/anno.json --out runs/grpo                                  # full scale, 8 GPUs
    # interrupted? the same command + --resume
Where we depart from the paper and the released code (verl + SGLang): docs/departures.md, each beside its line.
"""
import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import engine
import llm
import mmduet2
import reward
import runs

# ----------------------------------------------------------------------------
# The math: pure functions, tested by hand in tests/test_grpo.py


def group_advantages(rewards, eps=1e-4):
    """A = (r − group mean) / (group std + eps), per row of a (groups, G) tensor; exactly 0 for a tied group.

    std is the unbiased one (torch default, as in TRL). A group whose rewards all tie carries no signal about
    which rollout was better: its A is set to 0 outright, because in float32 the mean of G equal rewards is not
    always exactly that reward (G = 3, rewards 15.3: a residue of 1e-6 over std + eps = 1e-4 is a 1e-2 push).
        [[1, 2, 3, 4]] → mean 2.5, std 1.291 → [[-1.162, -0.387, 0.387, 1.162]]
        [[2, 2, 2, 2]] → [[0, 0, 0, 0]]
    """
    r = rewards.double()  # (groups, G); float64: the residues of mean/std stay far below eps
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)
    tied = (rewards == rewards[:, :1]).all(-1, keepdim=True)  # (groups, 1)
    return adv.masked_fill(tied, 0.0).to(rewards.dtype)


def policy_loss(logp, old_logp, adv, clip=0.2):
    """Per-token clipped surrogate loss (PPO/GRPO).

    logp, old_logp: (T,) log-probs of the generated tokens; adv: scalar or (T,).
        ratio = exp(logp − old_logp)
        loss_t = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A)
    On-policy (one update per batch) old_logp = logp.detach(): ratio = 1, so the loss *value* is −A per token
    while its gradient is −A·∇log p: the REINFORCE gradient with a group baseline.
    Worked example: A = 1, logp − old = log 1.5 (ratio 1.5): unclipped 1.5, clipped 1.2 → loss −1.2.
    Returns (per-token loss (T,), clipped (T,) bool).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


# ----------------------------------------------------------------------------
# Episodes and rollouts


@dataclass
class Episode:
    """A segment of one annotated video (Sec. 4.3.3): context turns with gold replies, then the turns to answer."""
    question_id: str
    frames: list            # (H, W, 3) uint8, at most --max-frames of them
    times: list             # the time of each user turn (frames so far × interval)
    texts: list             # each user turn's text (the question, a subtitle) or None
    context: dict           # turn index → the gold reply spoken there, for the turns before `start`
    start: int              # the first turn the policy answers
    end: int                # one past the last
    answers: list           # the gold answers the rollouts are scored on (those not already in the context)
    context_replies: list   # the replies already in the dialogue (r_rep and r_pfx compare against them)


@dataclass
class Rollout:
    """One of the G answers to an episode."""
    stream: engine.Stream  # its `seq` holds the exact ids, with mask 1 on what this rollout generated
    turns: list             # [(time, text)] of the segment's assistant turns, NO REPLY included
    logprobs: list          # log p of each generated id as sampled (softmax(logits / T)), for the log
    reward: dict = field(default_factory=dict)  # reward.mmduet2_reward: its parts and "total"


def turn_at(times, t):
    """The first turn whose time is at or after t (None if the video ends first)."""
    return next((j for j, tj in enumerate(times) if tj >= t - 1e-9), None)  # epsilon: float times (3 × 0.1 s)


def make_episode(example, args, rng):
    """One segment of an annotated video, drawn with `rng`: context up to `start`, the policy's turns after.

    The video comes from a ProactiveVideoQA anno.json (what data.py writes), not the released RL parquet files;
    at most --max-frames frames of it are read (the released cap: 90)."""
    frames = []
    for _, frame in mmduet2.read_frames(os.path.join(args.videos, example["video"]), args.interval):
        if len(frames) == args.max_frames:
            break
        frames.append(frame)
    times = mmduet2.turn_times(len(frames), args.interval, args.frames_per_turn)
    arrived = [[] for _ in times]  # user texts: each joins the first turn at or after its time, as at inference
    for c in example["conversation"]:
        j = turn_at(times, c.get("time") or 0.0)
        if c["role"] == "user" and j is not None:
            arrived[j].append(c["content"])
    question = example["conversation"][0]["content"]
    answers = [dict(a, question=a.get("question", question)) for a in example["answer"]]

    # The segment: n_seg turns containing the start of a randomly chosen reachable gold span, so that every
    # episode has something to say (where the segment lies is our rule; the paper gives its length, 20 s).
    n_seg = max(1, round(args.segment / (args.interval * args.frames_per_turn)))
    reachable = [a for a in answers if a["reply_timespan"][0] <= times[-1]]
    j_target = turn_at(times, rng.choice(reachable)["reply_timespan"][0]) if reachable else 0
    start = rng.randint(max(0, j_target - n_seg + 1), max(0, min(j_target, len(times) - n_seg)))
    end = min(start + n_seg, len(times))

    # The context: each gold answer before the segment, at the turn the SFT dialogue spoke it. data.py records
    # that turn's time as "sft_time" (an nQnA immediate answer is spoken at its question's turn, not at the end
    # of its span); gold files without it get the paper's rule, the end of the reply span.
    spoken, context = set(), {}
    for i, a in enumerate(answers):
        j = turn_at(times, a["sft_time"]) if "sft_time" in a else mmduet2.reply_turn(times, a["reply_timespan"])
        if j is not None and j < start:
            context[j] = f"{context[j]} {a['content']}" if j in context else a["content"]  # as data.py joins them
            spoken.add(i)
    return Episode(example["question_id"], frames, times, [mmduet2.turn_text(t) for t in arrived], context,
                   start, end, [a for i, a in enumerate(answers) if i not in spoken],
                   [context[j] for j in sorted(context)])


@torch.no_grad()
def rollouts(model, processor, ep, args):
    """The G rollouts of one episode: the context encoded once, then the G rows decoded as one batch (our KV-cached
    engine under transformers' `generate`, where the released code runs SGLang)."""
    fpt = args.frames_per_turn
    base = engine.Stream(model, processor)
    for j in range(ep.start):  # the context, gold replies included (mask 0: the policy did not write them)
        base.feed(ep.texts[j], ep.frames[j * fpt:(j + 1) * fpt])
        base.feed(ep.context.get(j, mmduet2.SILENCE), role="assistant")
    group = engine.Group(base, args.group)  # the context is encoded here, once for the G rows
    config = engine.decoding(processor, args.temperature, args.top_k, args.max_new_tokens)
    out = [Rollout(row, [], []) for row in group.rows]
    for j in range(ep.start, ep.end):
        for r, reply in zip(out, group.turn(ep.frames[j * fpt:(j + 1) * fpt], ep.texts[j], config)):
            r.turns.append((ep.times[j], reply.text))
            r.logprobs += reply.logprobs
    return out


# ----------------------------------------------------------------------------
# Arguments (defaults = the released recipe; --toy = a CPU-sized run)

TOY = dict(init="runs/sft-toy/final", anno="data/toy/rl/anno.json", out="runs/grpo-toy", judge="offline",
           # a tiny random-init model needs a larger step than 1e-6 (3e-4 broke its wording: docs/toy.md),
           # 8 passes over the 100 RL videos of 2 episodes per step (400 steps), toy replies are short
           lr=3e-5, epochs=8, episodes=2, max_new_tokens=16, grad_checkpointing=False, mixed_precision="no")


def parse_args(argv=None):
    p = runs.argument_parser("grpo.py", __doc__.split("\n")[0])
    path = os.path.expanduser  # the type of path flags: --out=~/x or a quoted '~/x' reaches us unexpanded
    # model and data
    p.add_argument("--init", default="runs/sft/final", type=path, help="the SFT checkpoint folder to start from")
    p.add_argument("--anno", default="data/web/rl/anno.json", type=path,
                   help="held-out RL videos' gold answers (anno.json)")
    p.add_argument("--videos", default=None, type=path,
                   help="folder of the videos named in --anno (default: videos/ beside it)")
    p.add_argument("--out", default="runs/grpo", type=path, help="checkpoints and metrics.jsonl go here")
    p.add_argument("--toy", action="store_true", help=runs.preset_help(TOY))
    # episodes (Sec. 4.3.3)
    p.add_argument("--segment", type=float, default=20.0, help="seconds of video the policy answers per episode (paper: 20)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames (paper: 2)")
    p.add_argument("--frames-per-turn", type=int, default=2, choices=(1, 2), help="frames per user turn (paper: 2)")
    p.add_argument("--frame-tokens", type=int, default=mmduet2.FRAME_TOKENS, help="max LLM tokens per frame (paper: 128)")
    p.add_argument("--max-frames", type=int, default=90, help="frames read per video, context + segment (paper: 90)")
    # rollouts
    p.add_argument("--group", type=int, default=4, help="rollouts per episode, G >= 2 (paper: 4)")
    p.add_argument("--episodes", type=int, default=1, help="episodes per rank per step")
    p.add_argument("--temperature", type=float, default=1.2, help="rollout sampling temperature (paper: 1.2)")
    p.add_argument("--top-k", type=int, default=10, help="rollout top-k (paper: 10)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="max new tokens per assistant turn (paper: 100)")
    # reward
    p.add_argument("--judge", choices=["offline", "openai"], default="openai",
                   help="openai: an LLM behind an OpenAI-compatible endpoint ($OPENAI_BASE_URL); offline: word overlap")
    p.add_argument("--judge-model", default=None, help="judge model (default: $JUDGE_MODEL)")
    p.add_argument("--judge-workers", type=int, default=16, help="judge requests in flight")
    p.add_argument("--weights", type=float, nargs=4, default=[3, 2, 0.5, 2], metavar=("PAUC", "REP", "IN_SPAN", "PFX"),
                   help="reward weights (Eq. 2: 3 2 0.5 2); the Table 6 ablations set one to 0")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate, constant (paper: 1e-6)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the RL videos (paper: 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs)")
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range ε")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default=None,
                   help="bf16 autocast over fp32 master weights (default: bf16 on GPU, no on CPU)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the update (needed at 3B; rollouts are unaffected)")
    # running it
    p.add_argument("--save-every", type=int, default=50, help="save OUT/step-N every N steps (0: only OUT/final)")
    p.add_argument("--keep", type=int, default=2, help="keep the last K step checkpoints (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="episode order and sampling seed")
    args = runs.parse_with_preset(p, TOY, argv)
    for bad, message in ((args.group < 2, "--group must be >= 2: a group's advantages compare its rollouts with each other"),
                         (not (args.segment > 0 and args.interval > 0), "--segment and --interval must be > 0 seconds"),
                         (args.max_frames < args.frames_per_turn, "--max-frames must hold at least one turn"),
                         (min(args.episodes, args.max_new_tokens, args.epochs) < 1,
                          "--episodes, --max-new-tokens, --epochs must be >= 1"),
                         (not (args.temperature > 0 and args.clip > 0 and 0 < args.lr < 1),
                          "--temperature and --clip must be > 0, --lr in (0, 1)"),
                         (min(args.top_k, args.max_steps, args.keep, args.save_every) < 0 or args.frame_tokens < 4,
                          "--top-k, --max-steps, --keep, --save-every must be >= 0, --frame-tokens >= 4")):
        if bad:
            p.error(message)
    args.videos = args.videos or os.path.join(os.path.dirname(args.anno), "videos")
    return args


# ----------------------------------------------------------------------------
# The loop


def load_examples(args, print0=print):
    """anno.json's examples, each video there and decodable, checked before the model loads; gold its video cannot
    reach (reward.gold_warnings) is said, one line each, and its episodes run as defined."""
    try:
        examples = reward.load_gold(args.anno)
    except (OSError, ValueError) as e:
        raise SystemExit(f"grpo.py: {e}") from None
    missing = [ex["video"] for ex in examples if not os.path.isfile(os.path.join(args.videos, ex["video"]))]
    if missing:
        raise SystemExit(f"grpo.py: {len(missing)} videos missing in {args.videos}, e.g. {missing[0]}")
    try:
        warned = [f"gold warning, {ex['question_id']}: {w}" for ex in examples for w in reward.gold_warnings(
            ex, mmduet2.video_duration(os.path.join(args.videos, ex["video"])), args.interval * args.frames_per_turn)]
    except (OSError, ValueError) as e:  # an undecodable video
        raise SystemExit(f"grpo.py: {e}") from None
    for line in warned:
        print0(line)
    return examples


def episodes_of(examples, args, step, rank, world):
    """This rank's episodes of `step` and the seed of its sampling: its share of one fixed permutation per epoch,
    drawn with (seed, step, rank), so a resumed run replays the same episodes and samples."""
    epoch, k = divmod(step * args.episodes * world, len(examples))
    order = list(range(len(examples)))
    random.Random(args.seed + epoch).shuffle(order)
    rng = random.Random(f"{args.seed}:{step}:{rank}")
    seed = rng.randrange(2**62)
    mine = [examples[order[(k + rank * args.episodes + e) % len(examples)]] for e in range(args.episodes)]
    return seed, [make_episode(ex, args, rng) for ex in mine]


def rollout_stats(flat, everything):
    """The step's reward statistics over all ranks (`everything`: the gathered rewards), the rest over this rank's
    rollouts (`flat`: [(episode, rollout)])."""
    parts = {key: torch.tensor([r.reward[key] for _, r in flat]) for key in ("pauc", "rep", "in_span", "prefix")}
    delays = [d for ep, r in flat for d in reward.reply_delays(r.turns, ep.answers)]
    std = everything.std(-1)  # (world · episodes,)
    return dict(reward=everything.mean().item(), reward_std=std.mean().item(),
                frac_reward_zero_std=(std == 0).float().mean().item(),
                **{k: v.mean().item() for k, v in parts.items()}, **{f"{k}_std": v.std().item() for k, v in parts.items()},
                replies_per_rollout=sum(not mmduet2.is_silent(t) for _, r in flat for _, t in r.turns) / len(flat),
                reply_delay=sum(delays) / len(delays) if delays else None)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    if args.toy and not cuda:  # the toy's numbers on any machine: torch's float sums depend on its thread count
        torch.set_num_threads(1)  # (docs/toy.md, as in sft.py)
    acc = runs.accelerator("grpo.py", args.out, args.mixed_precision)  # DDP under accelerate, OUT held
    rank, world, print0 = acc.process_index, acc.num_processes, acc.print
    # what a resumed run must share with the checkpoint (the episodes of step s are a function of these; --max-steps
    # and --epochs may grow): anno.json by content, a folder by its real path
    settings = {k: getattr(args, k) for k in ("seed", "group", "episodes", "interval", "frames_per_turn", "segment")} | {
        "init": os.path.realpath(args.init) if os.path.isdir(args.init) else args.init,
        "anno_sha256": runs.file_digest(args.anno), "world": world}
    ckpt, step = runs.start_run(args.out, args.resume, settings, acc.is_main_process)

    # -- data: checked before the model loads (a rank failing mid-run would leave the others in a collective)
    with runs.said_once(acc):  # these checks fail alike on every rank
        examples = load_examples(args, print0)
        per_step = args.episodes * world
        total_steps = args.max_steps or args.epochs * len(examples) // per_step
        if total_steps == 0:
            raise SystemExit(f"grpo.py: {len(examples)} examples cannot fill one step of {per_step} episodes")
        try:
            judge = reward.OfflineJudge() if args.judge == "offline" else llm.OpenAIJudge(
                model=args.judge_model, max_workers=args.judge_workers)
            # -- model: the policy in fp32, the optimizer's master copy; bf16 compute comes from autocast (the
            # released RL precision is not known to us: as in sft.py)
            model, processor = mmduet2.load_model(args.init, dtype=torch.float32, device=acc.device,
                                                  frame_tokens=args.frame_tokens)
        except (OSError, reward.JudgeError) as e:
            raise SystemExit(f"grpo.py: {e}") from None
    trained = runs.trainable(model, args.grad_checkpointing)  # frozen vision, gradients ready for DDP (as in SFT)
    # fused AdamW on a GPU: one kernel, none of foreach's temporary copies of the parameters
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0, fused=cuda)
    wrapped, optimizer = acc.prepare(model, optimizer)
    if ckpt:
        acc.load_state(os.path.join(ckpt, "state"))  # weights and optimizer (every step's randomness is re-seeded)
        print0(f"resumed from {ckpt} at step {step}")
    h, w = next(mmduet2.read_frames(os.path.join(args.videos, examples[0]["video"]), args.interval))[1].shape[:2]
    print0(f"{len(examples)} videos, {total_steps} steps of {per_step} episodes × {args.group} rollouts on {world} "
           f"rank(s), {mmduet2.frame_tokens(h, w, args.frame_tokens)} tokens per frame, {args.mixed_precision} precision")

    # The frames of the next step's episodes (up to 90 each) are decoded on a thread while this step rolls out and
    # updates, instead of on the main thread while the GPU waits (decord and numpy release the GIL).
    reader = ThreadPoolExecutor(1)
    upcoming = reader.submit(episodes_of, examples, args, step, rank, world)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if acc.is_main_process else None
    everything = adv = None
    flat = []  # the last step's rewards, advantages and rollouts are returned (for the tests)
    bar = tqdm(total=total_steps, initial=step, disable=not acc.is_main_process, desc="grpo", dynamic_ncols=True)
    while step < total_steps:
        t0 = time.time()

        # 1. Episodes: this rank's share of the step, read ahead; then the next step's are started
        episodes, error = [], None
        try:
            seed, episodes = upcoming.result()
            torch.manual_seed(seed)  # sampling uses torch's default generators (engine.Stream)
        except (OSError, ValueError) as e:  # an unreadable video: said below, by every rank at once
            error = str(e)
        if step + 1 < total_steps:
            upcoming = reader.submit(episodes_of, examples, args, step + 1, rank, world)
        t_episodes = time.time()

        # 2. Rollouts: G per episode, from the current policy (no collective in here: ranks go at their own pace)
        model.eval()
        with acc.autocast():
            groups = [rollouts(model, processor, ep, args) for ep in episodes]  # [episodes][G]
        flat = [(ep, r) for ep, g in zip(episodes, groups) for r in g]  # every rollout, with its episode
        t_rollout = time.time()

        # 3. Rewards: every rollout of this rank at once (the LLM judge answers requests concurrently)
        def score(ep, r):
            return reward.mmduet2_reward(r.turns, ep.answers, judge, ep.context_replies, tuple(args.weights))
        calls, failures = judge.calls, judge.failures
        try:  # llm.imap leaves at once on an error: a request in flight is not waited for
            for (_, r), parts in zip(flat, llm.imap(score, flat, judge.max_workers, desc="judge")):
                r.reward = parts
        except reward.JudgeError as e:  # the endpoint went away: no reward can be trusted from here on
            error = str(e)
        t_judge = time.time()

        # A rank that failed above stops every rank here, before the first collective of the step: alone, it would
        # leave the others waiting in it until its timeout (runs.first_failure)
        failure = runs.first_failure(acc, error)
        if failure:
            bar.close()
            raise SystemExit(f"grpo.py: {failure}; {runs.resume_hint(args.out)}" if acc.is_main_process else 1)

        # 4. Advantages: normalised within each group, over the rewards gathered from every rank. A group lives on
        # one rank (its G rollouts share one encoded context); the gather makes the statistics and logs global
        rewards = torch.tensor([[r.reward["total"] for r in g] for g in groups])  # (episodes, G)
        everything = acc.gather(rewards.to(acc.device)).cpu()  # (world · episodes, G), rank-major
        adv = group_advantages(everything)[rank * args.episodes:(rank + 1) * args.episodes]  # (episodes, G): ours

        # 5. Update: the loss of every generated token, averaged over those of the whole step on all ranks (a token
        # mean, our aggregation: every decision token weighs the same, however long its rollout)
        batch = [(r, a) for (_, r), a in zip(flat, adv.flatten())]  # (rollout, its advantage), in group order
        n_local = sum(len(r.logprobs) for r, _ in batch)
        n_global = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum"))
        model.train()
        clipped, loss_sum, gap = 0, 0.0, 0.0
        for i, (r, a) in enumerate(batch):
            # one gradient all-reduce per update: DDP's no_sync on every backward but the last
            with nullcontext() if i == len(batch) - 1 else acc.no_sync(wrapped):
                # log p of each generated token (mask 1: replies and NO REPLY alike) at the rollout temperature
                # T = 1.2 over the full vocabulary, without top-k, as verl computes it. The rollouts sampled from
                # that distribution cut to its top 10 tokens and renormalised; the loss does not see the cut: its
                # gradient −A·∇log p is the full tempered policy's, taken on samples of the truncated one (slightly
                # off-policy; where the top 10 hold nearly all the mass, the two agree). A token outside the top 10
                # is never sampled, so never pushed directly: it moves only through the softmax's normalisation.
                logp = mmduet2.forward_logprobs(model, r.stream.seq, args.temperature, wrapped=wrapped)  # (T,)
                # old_logp: this training forward's own values, detached, before the update (one update per batch,
                # on-policy: ratio exactly 1, the gradient is REINFORCE with the group baseline). Not the rollout's
                # log-probs: the KV-cached engine in eval mode (bf16 on a GPU) gives a slightly different number for
                # the same policy, which would make the ratio ≠ 1 and clip by noise (their distance: logprob_gap).
                old_logp = logp.detach()
                gap += (old_logp.cpu() - torch.tensor(r.logprobs)).abs().sum().item()
                loss_t, clip_t = policy_loss(logp, old_logp, a.to(logp.device), args.clip)
                # DDP averages gradients over ranks, hence × world for a mean over the global tokens
                loss = loss_t.sum() / (n_global / world)
                acc.backward(loss)
            clipped += int(clip_t.sum())
            loss_sum += loss.item()
        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # in place: the gradients stay DDP's bucket views (sft.py says why)
        step += 1
        t_end = time.time()

        # 6. Log: reward statistics over all ranks; the rest over this rank's rollouts
        row = dict(step=step, **rollout_stats(flat, everything),
                   judge_calls=judge.calls - calls, judge_failures=judge.failures - failures,
                   clip_ratio=clipped / max(1, n_local), loss=loss_sum, grad_norm=float(grad_norm),
                   logprob_gap=gap / max(1, n_local),  # |rollout − training| log p per token: 0 in fp32, small in bf16
                   tokens=n_global, tokens_per_s=n_global / (t_end - t0), time_episodes=t_episodes - t0,  # the wait
                   time_rollout=t_rollout - t_episodes, time_judge=t_judge - t_rollout, time_update=t_end - t_judge)
        if metrics:
            print(json.dumps(row), file=metrics, flush=True)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", replies=f"{row['replies_per_rollout']:.2f}")
        # --save-every alone writes step checkpoints (~55 GB each at 3B: weights, optimizer, state); the run's end
        # is OUT/final below, so a last step-N beside it would only double the disk a run needs
        if args.save_every and step % args.save_every == 0:
            runs.save_checkpoint(acc, wrapped, processor, args.out, f"step-{step:06d}", step, settings, args.keep)
    bar.close()
    reader.shutdown()
    runs.save_checkpoint(acc, wrapped, processor, args.out, "final", step, settings)
    print0(f"saved {os.path.join(args.out, 'final')} after {step} steps")
    return dict(model=model, rewards=everything, advantages=adv, rollouts=[r for _, r in flat])  # the last step


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(f"grpo.py: interrupted; {runs.resume_hint(parse_args().out)}", file=sys.stderr)
        sys.exit(130)
