"""grpo.py: the advantage and loss by hand, episodes (nQnA context included), the rollout mask and log-probs,
real steps (precision, checkpointing, resume, refusals) and 2 CPU ranks."""
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import another_run_writing, write_video

import grpo
import mmduet2
import data
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# the math

def test_group_advantages_by_hand():
    adv = grpo.group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
    std = (5 / 3) ** 0.5  # unbiased std of 1..4
    assert torch.allclose(adv[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal, no gradient
    assert torch.allclose(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-3)  # mean 0.75, std 1.5


@pytest.mark.parametrize("G", range(2, 9))
def test_tied_groups_get_exactly_zero_advantage(G):
    """float32 means of equal rewards are not always exact (G = 3: 15.3 → a 1e-2 push); ties must give 0."""
    for value in (15.3, 0.1, 1 / 3, -2.7, 14.999):
        rewards = torch.full((2, G), value, dtype=torch.float32)
        rewards[1, 0] += 1.0  # a second group that does differ keeps its signal
        adv = grpo.group_advantages(rewards)
        assert torch.equal(adv[0], torch.zeros(G)), (G, value, adv[0])
        assert adv[1, 0] > 0 and torch.isfinite(adv).all()


def test_group_below_two_is_refused():
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group", "1"])  # one rollout has no group to compare with (its std is NaN)


def test_policy_loss_by_hand():
    logp = torch.log(torch.tensor([0.3, 0.6, 0.2]))
    old = torch.log(torch.tensor([0.2, 0.6, 0.4]))  # ratios 1.5, 1.0, 0.5
    loss, clipped = grpo.policy_loss(logp, old, torch.tensor(1.0), clip=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, -1.0, -0.5]), atol=1e-6)  # min(1.5, 1.2); 1; min(0.5, 0.8)
    assert clipped.tolist() == [True, False, False]
    loss, clipped = grpo.policy_loss(logp, old, torch.tensor(-1.0), clip=0.2)
    assert torch.allclose(loss, torch.tensor([1.5, 1.0, 0.8]), atol=1e-6)  # −min(−1.5, −1.2) …
    assert clipped.tolist() == [False, False, True]
    # on-policy: value −A per token, gradient −A·∇log p
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = grpo.policy_loss(lp, lp.detach(), torch.tensor(2.0))
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([-2.0, -2.0])) and torch.allclose(lp.grad, torch.tensor([-2.0, -2.0]))


def test_toy_preset_never_overrides_a_typed_flag():
    toy = grpo.parse_args(["--toy"])
    assert (toy.lr, toy.judge, toy.max_new_tokens) == (3e-5, "offline", 16)
    typed = grpo.parse_args(["--toy", "--lr", "1e-6", "--judge", "openai", "--max-new-tokens", "100"])
    assert (typed.lr, typed.judge, typed.max_new_tokens) == (1e-6, "openai", 100)  # the defaults' values, typed


# ----------------------------------------------------------------------------
# episodes and rollouts

@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    """Two 16 s videos with two gold events each, in the ProactiveVideoQA anno.json format."""
    d = tmp_path_factory.mktemp("rl")
    os.makedirs(d / "videos")
    anno = []
    for i in range(2):
        write_video(d / "videos" / f"v{i}.mp4", 16, seed=i)
        anno.append({"video": f"v{i}.mp4", "question_id": f"q{i}", "duration": 16.0,
                     "conversation": [{"role": "user", "content": "Tell me whenever a new shape appears.", "time": 0.0},
                                      {"role": "user", "content": "Subtitle: one", "time": 0.5}],
                     "answer": [{"role": "assistant", "content": "A red square appeared on the left.",
                                 "related_timespan": [3.0, 7.0], "reply_timespan": [3.0, 8.0]},
                                {"role": "assistant", "content": "A blue square appeared on the top.",
                                 "related_timespan": [10.0, 13.0], "reply_timespan": [10.0, 14.0]}]})
    json.dump(anno, open(d / "anno.json", "w"))
    return d


SMALL = ["--interval", "1", "--frames-per-turn", "1", "--segment", "5", "--group", "2", "--max-new-tokens", "6",
         "--judge", "offline", "--no-grad-checkpointing", "--lr", "1e-3", "--save-every", "1"]


def test_episode_context_and_segment(rl_data):
    args = grpo.parse_args(["--anno", str(rl_data / "anno.json")] + SMALL)
    ex = reward.load_gold(str(rl_data / "anno.json"))[0]
    for seed in range(20):
        ep = grpo.make_episode(ex, args, random.Random(seed))
        seg = ep.times[ep.start:ep.end]
        assert len(seg) == 5 and ep.times == [float(t) for t in range(1, 17)]
        # texts that meet in one turn are joined as at inference (mmduet2.turn_text): one per line
        assert ep.texts[0] == "Tell me whenever a new shape appears.\nSubtitle: one" and ep.texts[1:] == [None] * 15
        # the segment contains the start of some gold span; gold replies before it are context
        assert any(seg[0] - 1 < a["reply_timespan"][0] <= seg[-1] for a in ex["answer"])
        for j, text in ep.context.items():  # no sft_time in this file: the end of the reply span
            assert j < ep.start and ep.times[j] == 8.0 and text == "A red square appeared on the left."
        assert len(ep.answers) + len(ep.context_replies) == 2


def test_nqna_context_replies_sit_where_the_sft_dialogue_spoke_them(tmp_path):
    """Independent reference: data.py's own SFT dialogue. For every segment start, the episode's context is
    exactly the dialogue's replies before it, turn for turn (an nQnA immediate answer at its question's turn)."""
    counts = data.make_toy(tmp_path, n_train=0, n_rl=4, n_test=0, nqna_frac=1.0, min_len=30, max_len=40)
    assert counts["rl"]["nqna"] == 4
    args = grpo.parse_args(["--anno", str(tmp_path / "rl" / "anno.json"), "--max-frames", "40"])
    dialogues = {d["id"]: d["messages"] for _, d in mmduet2.read_jsonl(tmp_path / "rl" / "sft.jsonl")}
    immediate = 0
    for ex in reward.load_gold(str(tmp_path / "rl" / "anno.json")):
        spoken = {j: m["content"] for j, m in enumerate(dialogues[ex["question_id"]][1::2]) if m["content"] != mmduet2.SILENCE}
        immediate += sum(a["content"].startswith("So far:") for a in ex["answer"])
        for seed in range(30):
            ep = grpo.make_episode(ex, args, random.Random(seed))
            assert ep.context == {j: text for j, text in spoken.items() if j < ep.start}, (ex["question_id"], ep.start)
            assert ep.context_replies == [spoken[j] for j in sorted(spoken) if j < ep.start]
    assert immediate >= 2  # immediate answers were there to be placed


def test_rollout_mask_and_logprobs(rl_data, tiny):
    """Each rollout's mask covers exactly what it generated (its replies, NO REPLY turns included, and their
    <|im_end|>), and the training forward's log-probs equal those the rollout sampled from."""
    model, processor = tiny
    args = grpo.parse_args(["--anno", str(rl_data / "anno.json")] + SMALL)
    ep = grpo.make_episode(reward.load_gold(str(rl_data / "anno.json"))[1], args, random.Random(3))
    assert ep.start > 0  # a context to share
    torch.manual_seed(0)
    group = grpo.rollouts(model, processor, ep, args)
    assert len(group) == 2
    for r in group:
        assert [t for t, _ in r.turns] == ep.times[ep.start:ep.end]
        ids, mask = r.stream.seq.ids, r.stream.seq.mask
        runs = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]  # where each trained run starts
        header = processor.tokenizer.encode("<|im_start|>assistant\n")
        assert len(runs) == len(r.turns) and all(ids[i - len(header):i] == header for i in runs)
        for i, (_, text) in zip(runs, r.turns):  # each run is exactly the turn the rollout said
            n = next(k for k in range(i, len(mask) + 1) if k == len(mask) or not mask[k]) - i
            assert processor.tokenizer.decode(ids[i:i + n], skip_special_tokens=True) == text
        generated = [i for i, m in zip(ids, mask) if m]
        assert len(generated) == len(r.logprobs) > 0
        with torch.no_grad():
            full = mmduet2.forward_logprobs(model, r.stream.seq, args.temperature)
        assert torch.allclose(full, torch.tensor(r.logprobs), atol=1e-4)


# ----------------------------------------------------------------------------
# real steps

@pytest.fixture(autouse=True)
def fresh_accelerator():
    """grpo.main builds an Accelerator, whose state is one per process: let each test choose its precision."""
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def chatty_ckpt(chatty, tmp_path_factory):
    """The overfit tiny model on disk: sometimes silent, so a group's rewards differ (a random model
    replies at every turn, every rollout scores the same, and every advantage is 0)."""
    d = tmp_path_factory.mktemp("chatty")
    chatty[0].save_pretrained(d)
    chatty[1].save_pretrained(d)
    return str(d)


def trained(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if not n.startswith("model.visual.")
            or n.startswith("model.visual.merger.")}


def test_one_step_changes_parameters_and_resumes(rl_data, chatty_ckpt, tmp_path):
    out, anno = tmp_path / "run", tmp_path / "anno.json"
    shutil.copy(rl_data / "anno.json", anno)  # a copy, to change under the run below
    base = ["--init", chatty_ckpt, "--anno", str(anno), "--videos", str(rl_data / "videos"), "--out", str(out)] + \
        SMALL + ["--episodes", "2"]
    result = grpo.main(base + ["--max-steps", "1"])
    assert result["rewards"].std(-1).max() > 0  # some group had a signal (with these seeds)
    before = mmduet2.load_model(chatty_ckpt)[0]
    after = dict(result["model"].named_parameters())
    changed = [n for n, p in before.named_parameters() if not torch.equal(after[n].detach().cpu(), p)]
    assert len(changed) > 10 and not any(n.startswith("model.visual.blocks") for n in changed)  # the ViT is frozen
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 1 and {"reward", "reward_std", "frac_reward_zero_std", "pauc", "rep", "in_span", "prefix",
                            "replies_per_rollout", "clip_ratio", "tokens_per_s", "judge_calls", "logprob_gap"} <= set(m[0])
    assert m[0]["logprob_gap"] < 1e-4  # fp32: the rollouts sampled from exactly what the update trains
    assert os.path.isdir(out / "step-000001") and os.path.isdir(out / "final")
    # a second run into the same folder without --resume would mix two runs: refused
    with pytest.raises(SystemExit, match="pass --resume"):
        grpo.main(base + ["--max-steps", "2"])
    # resume: steps 2 and 3 continue from step-000001's weights and optimizer; --keep 1 deletes older folders
    grpo.main(base + ["--max-steps", "3", "--resume", "--keep", "1"])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(d.name for d in out.iterdir() if d.name.startswith("step-")) == ["step-000003"]
    # a resume with other settings (another seed: other episodes) is refused
    with pytest.raises(SystemExit, match="other settings"):
        grpo.main(base + ["--max-steps", "3", "--resume", "--seed", "1"])
    # the anno.json is compared by content: another spelling of its path resumes (nothing left to run here) ...
    grpo.main(base + ["--max-steps", "3", "--resume", "--anno", str(tmp_path / "." / "anno.json")])
    # ... and the same path with other gold in it (other episodes) is refused
    anno.write_text(anno.read_text().replace('"reply_timespan": [3.0, 8.0]', '"reply_timespan": [4.0, 8.0]'))
    with pytest.raises(SystemExit, match="other settings \\(anno_sha256: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now\\)"):
        grpo.main(base + ["--max-steps", "3", "--resume"])


def test_save_every_alone_writes_step_checkpoints(rl_data, tmp_path):
    """A step checkpoint (~55 GB at 3B) is written every --save-every steps and at no other time: the last step wrote
    one too, whatever --save-every said, and tools/bench.py gpu's GRPO stage ran out of its disk. The end is `final`."""
    base = ["--init", "tiny", "--anno", str(rl_data / "anno.json")] + SMALL + ["--max-steps", "3"]
    for every, steps in (("2", ["step-000002"]), ("0", [])):
        out = tmp_path / every
        grpo.main(base + ["--save-every", every, "--out", str(out)])
        assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["final"] + steps, every


def test_episode_frames_are_read_off_the_main_thread(rl_data, tmp_path, monkeypatch):
    """Every episode's frames are decoded on the reader thread (the next step's while this one rolls out and
    updates), never on the main thread that drives the model; the metrics say how long a step waited for them."""
    import threading
    threads, make_episode = [], grpo.make_episode

    def recorded(*args):
        threads.append(threading.current_thread() is threading.main_thread())
        return make_episode(*args)
    monkeypatch.setattr(grpo, "make_episode", recorded)
    out = tmp_path / "run"
    grpo.main(["--init", "tiny", "--anno", str(rl_data / "anno.json"), "--out", str(out), "--max-steps", "3"] + SMALL)
    assert threads == [False] * 3  # one episode per step, none read on the main thread
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["time_episodes"] >= 0 and r["time_rollout"] > 0 for r in rows)


def test_resume_equals_an_uninterrupted_run(rl_data, chatty_ckpt, tmp_path):
    """Killed after step 2 of 3 (the later checkpoint lost), resumed: the same weights and the same log."""
    base = ["--init", chatty_ckpt, "--anno", str(rl_data / "anno.json")] + SMALL + ["--max-steps", "3", "--keep", "0"]
    straight = trained(grpo.main(base + ["--out", str(tmp_path / "a")])["model"])
    cut = tmp_path / "b"
    grpo.main(base + ["--out", str(cut)])
    shutil.rmtree(cut / "step-000003")
    shutil.rmtree(cut / "final")
    resumed = trained(grpo.main(base + ["--out", str(cut), "--resume"])["model"])
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)
    log = lambda d: [json.loads(line)["reward"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert log(cut) == log(tmp_path / "a")


def test_full_scale_precision_moves_every_trained_weight(rl_data, chatty_ckpt, tmp_path):
    """The full-scale path (fp32 master weights, bf16 autocast, gradient checkpointing) at the paper's lr 1e-6:
    one AdamW step moves essentially every trained weight. (Weights stored in bf16 would move 2%, norms never:
    1e-6 is far below half a bf16 ulp of a typical weight.) Autocast runs on the CPU too."""
    before = trained(mmduet2.load_model(chatty_ckpt)[0])
    argv = ["--init", chatty_ckpt, "--anno", str(rl_data / "anno.json"), "--out", str(tmp_path / "run")] + SMALL
    argv += ["--lr", "1e-6", "--mixed-precision", "bf16", "--grad-checkpointing", "--max-steps", "1", "--group", "4"]
    result = grpo.main(argv)
    assert result["rewards"].std(-1).max() > 0  # a signal: nonzero advantages, nonzero gradients
    after = trained(result["model"])
    moved = sum(int((after[n] != p).sum()) for n, p in before.items()) / sum(p.numel() for p in before.values())
    assert moved > 0.99, moved
    assert all(p.dtype == torch.float32 for p in result["model"].parameters())  # the master copy stays fp32
    step = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert 0 <= step["logprob_gap"] < 0.1  # bf16 rollouts vs the bf16 update: close (logged to watch it at scale)


def test_gradient_checkpointing_gives_the_same_step(rl_data, chatty_ckpt, tmp_path):
    """The default (checkpointing on, non-reentrant) trains exactly what a plain backward trains. A reentrant
    checkpoint would leave the layers without gradients here (their inputs do not require grad)."""
    argv = ["--init", chatty_ckpt, "--anno", str(rl_data / "anno.json")] + SMALL + ["--max-steps", "1"]
    plain = trained(grpo.main(argv + ["--out", str(tmp_path / "plain")])["model"])
    ckpt = trained(grpo.main(argv + ["--out", str(tmp_path / "ckpt"), "--grad-checkpointing"])["model"])
    before = trained(mmduet2.load_model(chatty_ckpt)[0])
    assert any(not torch.equal(plain[n], before[n]) for n in plain if ".layers." in n)  # the layers did learn
    for name, value in plain.items():
        torch.testing.assert_close(ckpt[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_two_cpu_ranks_synchronise_and_share_rewards(rl_data, chatty_ckpt, tmp_path):
    """accelerate launch with 2 gloo ranks: identical parameters after a step, advantages from the gathered rewards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch, grpo\n"
        "from accelerate.state import PartialState\n"
        "r = grpo.main(sys.argv[1:])\n"
        "rank = PartialState().process_index\n"
        "torch.save({'params': torch.cat([p.detach().flatten() for p in r['model'].parameters()]),\n"
        "            'rewards': r['rewards'], 'adv': r['advantages']}, f'{sys.argv[sys.argv.index(\"--out\") + 1]}/rank{rank}.pt')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
           "--init", chatty_ckpt, "--anno", str(rl_data / "anno.json"), "--out", str(out), "--max-steps", "1"] + SMALL + [
           "--group", "4"]  # with 4 rollouts a group whose rewards all tie (no signal) is unlikely
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert torch.equal(r0["params"], r1["params"])  # DDP really synchronised the update
    assert r0["rewards"].std(-1).max() > 0  # a signal to learn from (with these seeds)
    assert not torch.equal(r0["params"], torch.cat([p.flatten() for p in mmduet2.load_model(chatty_ckpt)[0].parameters()]))
    assert r0["rewards"].shape == (2, 4) and torch.equal(r0["rewards"], r1["rewards"])  # both ranks see all rewards
    adv = grpo.group_advantages(r0["rewards"])
    assert torch.allclose(r0["adv"], adv[0:1]) and torch.allclose(r1["adv"], adv[1:2])


def launch_two_ranks(program, argv, timeout=600):
    """`accelerate launch` of a Python file on 2 gloo ranks (explicit flags: no accelerate config is read)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *program, *argv]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_update_gradients_stay_views_of_ddp_buckets(rl_data, chatty_ckpt, tmp_path):
    """The update accumulates over a rank's rollouts (DDP's no_sync on all but the last backward). After every backward
    the gradients are views into DDP's few buckets, never one fresh tensor per parameter (tests/test_sft.py says why)."""
    out = tmp_path / "run"
    run = launch_two_ranks([os.path.join("tests", "ddp_probe.py"), "grpo"], ["--init", chatty_ckpt, "--anno",
                           str(rl_data / "anno.json"), "--out", str(out), "--max-steps", "2"] + SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        counts = json.load(open(out / f"grad-storages-rank{rank}.json"))
        assert len(counts) == 2 * 2 and max(counts) <= 3, counts  # 2 steps × G = 2 rollouts; the tiny model: 31 tensors
        assert json.load(open(out / f"timeout-rank{rank}.json")) == [30 * 60]  # as sft.py: a checkpoint's write


RANK_1_JUDGE_FAILS = """
import itertools, os, sys, time
import grpo, reward
calls = itertools.count()

class Judge(reward.OfflineJudge):
    max_workers = 4  # requests in flight at once, as with an LLM judge

    def score(self, *args):
        if os.environ["RANK"] == "1":
            if next(calls) == 0:
                raise reward.JudgeError("the judge endpoint went away")
            time.sleep(600)  # the other requests in flight wait on a judge that will never answer
        return super().score(*args)

reward.OfflineJudge = Judge
grpo.main(sys.argv[1:])
"""


@pytest.mark.parametrize("failure", ["judge", "video"])
def test_one_rank_failing_stops_every_rank_with_one_line(rl_data, tmp_path, failure):
    """2 gloo ranks. Rank 1's judge goes away (while its other requests hang): every rank stops at the step's first
    collective, with one line from rank 0 naming the rank and the reason (before, the failing rank waited for its
    requests in flight, ~10 min here, while the other waited in the reward gather). An unreadable video is found
    at start-up, before the model loads: one line, from rank 0 only (before, a traceback on each rank)."""
    anno = rl_data / "anno.json"
    if failure == "video":  # v1 is unreadable
        shutil.copytree(rl_data, tmp_path / "data")
        (tmp_path / "data" / "videos" / "v1.mp4").write_bytes(b"not a video" * 500)
        anno = tmp_path / "data" / "anno.json"
    program = tmp_path / "judge.py"
    program.write_text(RANK_1_JUDGE_FAILS if failure == "judge" else "import sys, grpo\ngrpo.main(sys.argv[1:])\n")
    run = launch_two_ranks([str(program)], ["--init", "tiny", "--anno", str(anno), "--out", str(tmp_path / "run"),
                                            "--max-steps", "2"] + SMALL + ["--group", "4"], timeout=300)
    ours = [line for line in run.stderr.splitlines() if line.startswith("grpo.py: ")]
    reason = "rank 1: the judge endpoint went away" if failure == "judge" else "cannot decode video .*v1.mp4"
    assert run.returncode != 0 and len(ours) == 1 and re.match(f"grpo.py: {reason}", ours[0]), run.stderr[-3000:]
    assert "Traceback" not in "".join(line for line in run.stderr.splitlines() if line.startswith("[rank"))


@pytest.mark.parametrize("argv, message", [
    (["--group", "1"], "--group must be >= 2"), (["--segment", "0"], "--segment and --interval must be > 0"),
    (["--interval", "-2"], "--segment and --interval must be > 0"), (["--max-frames", "1"], "--max-frames must hold"),
    (["--episodes", "0"], "--episodes, --max-new-tokens"), (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--temperature", "0"], "--temperature and --clip"),
    (["--lr", "0"], "--lr in (0, 1)"), (["--top-k", "-1"], "--top-k, --max-steps"), (["--judge", "gpt"], "invalid choice"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        grpo.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("grpo.py: ") and message in err and err.count("\n") == 1, err


def test_a_second_run_into_the_same_out_is_refused(rl_data, tmp_path):
    out = tmp_path / "run"
    with another_run_writing(out, folder=True) as pid:
        with pytest.raises(SystemExit) as e:
            grpo.main(["--init", "tiny", "--anno", str(rl_data / "anno.json"), "--out", str(out)] + SMALL)
    assert str(e.value.code).startswith(f"grpo.py: {out} is being written by another run (pid {pid} on ")
    assert os.listdir(out) == [".lock"]


def test_gold_the_video_cannot_reach_is_said_before_the_model_loads(rl_data, tmp_path, capsys):
    gold = json.load(open(rl_data / "anno.json"))
    gold[0]["duration"] = 30.0  # its video lasts 16 s
    gold[1]["answer"][1]["reply_timespan"] = [17.0, 18.0]  # after its video ends
    (tmp_path / "anno.json").write_text(json.dumps(gold))
    with pytest.raises(SystemExit, match="model folder not found"):  # stopped at the model, after the data checks
        grpo.main(["--anno", str(tmp_path / "anno.json"), "--videos", str(rl_data / "videos"), "--init",
                   str(tmp_path / "nope"), "--out", str(tmp_path / "run")] + SMALL)
    printed = capsys.readouterr().out
    assert "gold warning, q0: 'duration' is 30 s but the video lasts 16 s" in printed
    assert "gold warning, q1: reply span 1 [17, 18] starts after the video ends (16 s)" in printed


def test_bad_setup_is_one_line_before_any_step(rl_data, tmp_path, monkeypatch):
    base = ["--anno", str(rl_data / "anno.json")] + SMALL
    with pytest.raises(SystemExit, match="^grpo.py: model folder not found"):
        grpo.main(base + ["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    with pytest.raises(SystemExit, match="^grpo.py: no judge model"):
        grpo.main(base + ["--init", "tiny", "--judge", "openai", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="^grpo.py: .*nope.json: cannot read"):
        grpo.main(SMALL + ["--anno", str(tmp_path / "nope.json"), "--out", str(tmp_path / "c")])
