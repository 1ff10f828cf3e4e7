"""The GPU path, checked against the same computation on the CPU. Skipped where CUDA is absent (CI).

    python -m pytest -m gpu -q                                   # on a GPU machine (tools/bench.py gpu runs it too)
    MMDUET2_TEST_DEVICE=cpu python -m pytest -m gpu -q           # a dry run of the same code on the CPU

What runs on the device: the tiny model through greedy and sampled (T 1.2, top-k 10) Stream turns and a
Group rollout, each held to a CPU forward over the same ids; one SFT step and one GRPO step in the full-scale
precision (fp32 master weights, bf16 autocast), each held to the same step computed on the CPU; and the 3B
architecture with random weights at reduced depth, in bf16, for one streamed turn with 128-token frames.
Tolerances: fp32 on both sides agrees to 1e-3 (kernels differ); bf16 autocast on a GPU and on a CPU rounds
differently, so steps are compared by direction (cosine of the weight updates), not to the last bit.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import random_frames, write_video

import engine
import grpo
import mmduet2

DEVICE = os.environ.get("MMDUET2_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs CUDA (MMDUET2_TEST_DEVICE=cpu for a dry run)")]
QUESTION = "Tell me whenever a new shape appears."


@pytest.fixture(scope="module")
def pair(chatty):
    """The overfit tiny model (silent on some turns, replying on others) on the CPU and on the device, fp32."""
    model, processor, frames, _ = chatty
    # the reference must be what its name says: on a GPU machine, a fixture left to load_model's defaults got
    # the GPU in bf16, and the "CPU" side of every comparison below was the device itself
    assert model.device.type == "cpu" and model.dtype == torch.float32
    return model, copy.deepcopy(model).to(DEVICE), processor, frames


def full_logprobs(model, seq, temperature):
    with torch.no_grad():
        return mmduet2.forward_logprobs(model, seq, temperature)


def test_greedy_turns_on_the_device_equal_the_cpu(pair):
    cpu, dev, processor, frames = pair
    greedy = engine.decoding(processor, max_new_tokens=16)
    a, b, silent = engine.Stream(cpu, processor), engine.Stream(dev, processor), set()
    for k in range(6):
        ra = a.turn(frames[k:k + 1], QUESTION if k == 0 else None, greedy)
        rb = b.turn(frames[k:k + 1], QUESTION if k == 0 else None, greedy)
        assert ra.ids == rb.ids and np.allclose(ra.logprobs, rb.logprobs, atol=1e-3)
        silent.add(rb.silent)
    assert b.cache.get_seq_length() == b.cached and silent == {True, False}  # fast silence accepted and rejected


def test_sampled_turns_on_the_device_match_a_cpu_forward(pair):
    """T 1.2, top-k 10 with fast silence (the draft is accepted or not by draws on the device)."""
    cpu, dev, processor, frames = pair
    rollout = engine.decoding(processor, temperature=1.2, top_k=10, max_new_tokens=10)
    torch.manual_seed(0)
    s, logprobs = engine.Stream(dev, processor), []
    for k in range(6):
        logprobs += s.turn(frames[k:k + 1], QUESTION if k == 0 else None, rollout).logprobs
    assert torch.allclose(full_logprobs(cpu, s.seq, 1.2), torch.tensor(logprobs), atol=1e-3)


def test_group_rollout_on_the_device_matches_cpu_forwards(pair):
    cpu, dev, processor, frames = pair
    base = engine.Stream(dev, processor)
    base.feed(QUESTION, frames[:1])
    base.feed(mmduet2.SILENCE, role="assistant")
    group = engine.Group(base, 4)
    rollout = engine.decoding(processor, temperature=1.2, top_k=10, max_new_tokens=10)
    torch.manual_seed(0)
    logprobs = [[] for _ in range(4)]
    for k in range(1, 6):
        for b, reply in enumerate(group.turn(frames[k:k + 1], config=rollout)):
            logprobs[b] += reply.logprobs
    for b, row in enumerate(group.rows):
        assert int(group.mask[b].sum()) == row.cached
        assert torch.allclose(full_logprobs(cpu, row.seq, 1.2), torch.tensor(logprobs[b]), atol=1e-3)


def amp(device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def sft_step(model, seq, device, lr=1e-4):
    """One SFT step as sft.py takes it at full scale: fp32 weights, bf16 autocast, AdamW. Returns (loss, update)."""
    model = copy.deepcopy(model).to(device).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=torch.device(device).type == "cuda")
    with amp(device):
        logp = mmduet2.forward_logprobs(model, seq)
    loss = -logp.mean()
    loss.backward()
    opt.step()
    return loss.item(), torch.cat([(p.detach() - before[n]).flatten().float().cpu() for n, p in model.named_parameters()])


def test_sft_step_in_bf16_autocast_matches_the_cpu(pair):
    cpu, _, processor, frames = pair
    messages = [{"role": "user", "content": mmduet2.IMAGE * 2 + QUESTION}, {"role": "assistant", "content": "NO REPLY"},
                {"role": "user", "content": mmduet2.IMAGE * 2}, {"role": "assistant", "content": "A red square appeared on the left."}]
    seq = mmduet2.encode_dialogue(processor, messages, frames[:4])
    loss_d, step_d = sft_step(cpu, seq, DEVICE)
    loss_c, step_c = sft_step(cpu, seq, "cpu")
    assert loss_d == pytest.approx(loss_c, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(step_d, step_c, 0) > 0.95
    assert (step_d != 0).float().mean() > 0.99  # fp32 master weights: every weight moved


@pytest.fixture(scope="module")
def rl_set(tmp_path_factory, chatty):
    """Two 12 s videos with gold events, and the chatty model as a checkpoint folder."""
    d = tmp_path_factory.mktemp("gpu_rl")
    os.makedirs(d / "videos")
    anno = []
    for i in range(2):
        write_video(d / "videos" / f"v{i}.mp4", 12, seed=i)
        anno.append({"video": f"v{i}.mp4", "question_id": f"q{i}", "duration": 12.0,
                     "conversation": [{"role": "user", "content": QUESTION, "time": 0.0}],
                     "answer": [{"role": "assistant", "content": "A red square appeared on the left.",
                                 "related_timespan": [3.0, 6.0], "reply_timespan": [3.0, 7.0]}]})
    json.dump(anno, open(d / "anno.json", "w"))
    chatty[0].save_pretrained(d / "model")
    chatty[1].save_pretrained(d / "model")
    return d


def test_grpo_step_on_the_device_matches_the_same_update_on_the_cpu(rl_set, tmp_path):
    """grpo.py's own step on the device (bf16 autocast over fp32, the paper's lr 1e-6): every trained weight moves,
    and the update points where the same update, recomputed on the CPU from the step's own rollouts, points."""
    from accelerate.state import AcceleratorState
    argv = ["--init", str(rl_set / "model"), "--anno", str(rl_set / "anno.json"), "--out", str(tmp_path / "run"),
            "--interval", "1", "--frames-per-turn", "1", "--segment", "5", "--group", "4", "--max-new-tokens", "8",
            "--judge", "offline", "--lr", "1e-6", "--mixed-precision", "bf16", "--max-steps", "1"]
    try:
        result = grpo.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    init = mmduet2.load_model(str(rl_set / "model"), dtype=torch.float32, device="cpu")[0]
    trained = [n for n, p in init.named_parameters() if not n.startswith("model.visual.") or ".merger." in n]
    after = dict(result["model"].named_parameters())
    update = torch.cat([(after[n].detach().cpu() - dict(init.named_parameters())[n].detach()).flatten() for n in trained])
    assert result["rewards"].std(-1).max() > 0 and (update != 0).float().mean() > 0.99
    # the same update on the CPU: the rollouts' ids, the advantages, the token-mean loss, clip, one AdamW step
    batch = [(r, a) for r, a in zip(result["rollouts"], result["advantages"].flatten())]
    n_tokens = sum(sum(r.stream.seq.mask) for r, _ in batch)
    init.train()
    params = [dict(init.named_parameters())[n] for n in trained]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    for r, a in batch:
        with amp("cpu"):
            logp = mmduet2.forward_logprobs(init, r.stream.seq, 1.2)
        loss_t, _ = grpo.policy_loss(logp, logp.detach(), a)
        (loss_t.sum() / n_tokens).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    reference = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert torch.nn.functional.cosine_similarity(update, reference, 0) > 0.9


def test_3b_architecture_in_bf16_streams_a_turn():
    """Qwen2.5-VL-3B's widths (2 of its 36 layers, 2 of its 32 vision blocks), random weights, bf16, two 448×224
    frames of 128 tokens each: the turn runs, and its cached log-probs match one full forward."""
    from tools import bench
    _, processor = mmduet2.tiny_model()
    mmduet2.set_frame_tokens(processor, 128)
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2_5_VLForConditionalGeneration._from_config(bench.qwen_3b_config(processor, 2), dtype=torch.bfloat16)
    model.eval()
    frames = random_frames(2, size=448)
    frames = [f[:, :224] for f in frames]  # 448 × 224: exactly 128 tokens
    s = engine.Stream(model, processor)
    reply = s.turn(frames, QUESTION, engine.decoding(processor, max_new_tokens=8), fast_silence=False)
    assert sum(s.seq.mm_types) == 256 and len(reply.ids) >= 1
    full = full_logprobs(model, s.seq, 1.0).float().cpu()  # the full forward, on the device too
    assert torch.isfinite(full).all() and (full - torch.tensor(reply.logprobs)).abs().mean() < 0.1
