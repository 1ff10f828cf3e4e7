"""grpo.py: the advantage and loss by hand, the rollout mask and log-probs, one real step, and 2 CPU ranks."""
import json
import os
import random
import socket
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from conftest import write_video

import grpo
import mmduet2
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_by_hand():
    adv = grpo.group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
    std = (5 / 3) ** 0.5  # unbiased std of 1..4
    assert torch.allclose(adv[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: no signal, no gradient
    assert torch.allclose(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-3)  # mean 0.75, std 1.5


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
    # k3 KL: exp(d) − d − 1 ≥ 0, zero when the policy equals the reference
    loss_kl, _ = grpo.policy_loss(lp, lp.detach(), torch.tensor(0.0), ref_logp=torch.tensor([-1.0, -1.5]), kl_coef=0.1)
    assert loss_kl[0].item() == 0.0 and loss_kl[1].item() == pytest.approx(0.1 * (torch.exp(torch.tensor(0.5)) - 1.5).item())


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    """Two 16 s videos with two gold events each, in the ProactiveVideoQA anno.json format."""
    d = tmp_path_factory.mktemp("rl")
    os.makedirs(d / "videos")
    anno = []
    for i in range(2):
        write_video(d / "videos" / f"v{i}.mp4", 16, seed=i)
        anno.append({"video": f"v{i}.mp4", "question_id": f"q{i}", "duration": 16.0,
                     "conversation": [{"role": "user", "content": "Tell me whenever a new shape appears.", "time": 0.0}],
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
    ex = mmduet2.load_anno(str(rl_data / "anno.json"))[0]
    for seed in range(20):
        ep = grpo.make_episode(ex, str(rl_data / "videos"), args, random.Random(seed))
        seg = ep["times"][ep["start"]:ep["end"]]
        assert len(seg) == 5 and ep["times"] == [float(t) for t in range(1, 17)]
        assert ep["texts"][0] == "Tell me whenever a new shape appears." and ep["texts"][1:] == [None] * 15
        # the segment contains the start of some gold span; gold replies before it are context
        assert any(seg[0] - 1 < a["reply_timespan"][0] <= seg[-1] for a in ex["answer"])
        for j, texts in ep["placed"].items():
            assert j < ep["start"] and ep["times"][j] == 8.0 and texts == ["A red square appeared on the left."]
        assert len(ep["answers"]) + len(ep["context_replies"]) == 2


def test_rollout_mask_and_logprobs(rl_data, tiny):
    """Each rollout's mask covers exactly what it generated, and the training forward's log-probs
    equal the log-probs the rollout sampled from."""
    model, processor = tiny
    args = grpo.parse_args(["--anno", str(rl_data / "anno.json")] + SMALL)
    ep = grpo.make_episode(mmduet2.load_anno(str(rl_data / "anno.json"))[1], str(rl_data / "videos"), args,
                           random.Random(3))
    assert ep["start"] > 0  # a context to share
    torch.manual_seed(0)
    group = grpo.rollouts(model, processor, ep, args)
    assert len(group) == 2
    for stream, turns, logps in group:
        assert [t for t, _ in turns] == ep["times"][ep["start"]:ep["end"]]
        generated = [i for i, m in zip(stream.seq.ids, stream.seq.mask) if m]
        n_ctx = len(mmduet2.Stream(model, processor).seq.ids)
        assert all(m == 0 for m in stream.seq.mask[:n_ctx])
        assert len(generated) == len(logps) > 0
        with torch.no_grad():
            full = mmduet2.forward_logprobs(model, stream.seq, args.temperature)
        assert torch.allclose(full, logps, atol=1e-4)


@pytest.fixture(scope="module")
def chatty_ckpt(chatty, tmp_path_factory):
    """The overfit tiny model on disk: sometimes silent, so a group's rewards differ (a random model
    replies at every turn, every rollout scores the same, and every advantage is 0)."""
    d = tmp_path_factory.mktemp("chatty")
    chatty[0].save_pretrained(d)
    chatty[1].save_pretrained(d)
    return str(d)


def test_one_step_changes_parameters_and_resumes(rl_data, chatty_ckpt, tmp_path):
    out = tmp_path / "run"
    base = ["--init", chatty_ckpt, "--anno", str(rl_data / "anno.json"), "--out", str(out)] + SMALL + ["--episodes", "2"]
    result = grpo.main(base + ["--max-steps", "1"])
    assert result["rewards"].std(-1).max() > 0  # some group had a signal (with these seeds, the second)
    before = mmduet2.load_model(chatty_ckpt)[0]
    after = result["model"]
    changed = [n for (n, p), q in zip(after.named_parameters(), before.parameters()) if not torch.equal(p.cpu(), q)]
    assert len(changed) > 10
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 1 and {"reward", "reward_std", "frac_reward_zero_std", "pauc", "rep", "in_span", "prefix",
                            "replies_per_rollout", "clip_ratio", "tokens_per_s", "judge_calls"} <= set(m[0])
    assert os.path.isdir(out / "step-1") and os.path.isdir(out / "final")
    # resume: a second step continues from step-1's weights and optimizer
    grpo.main(base + ["--max-steps", "2", "--resume"])
    assert os.path.isdir(out / "step-2") and len(open(out / "metrics.jsonl").readlines()) == 2
    grpo.main(base + ["--max-steps", "3", "--resume", "--keep", "1"])  # older step folders are deleted
    assert sorted(d.name for d in out.iterdir() if d.name.startswith("step-")) == ["step-3"]


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
    assert torch.allclose(r0["adv"], adv[0]) and torch.allclose(r1["adv"], adv[1])
