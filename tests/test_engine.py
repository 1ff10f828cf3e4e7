"""engine.py: the streaming engine held to one full forward over the same ids (a stream, fed context and
forks, every row of a Group), the bf16 rollout cache, and fast silence (greedy: identical; sampled: the
same distribution)."""
import numpy as np
import pytest
import torch

import engine
import mmduet2
from engine import Stream
from conftest import random_frames
from mmduet2 import SILENCE, Chunk

QUESTION = "Tell me whenever a new shape appears."


def test_golden_streaming_equals_full_forward(chatty):
    """Logits at every assistant position of a cached stream == one full forward over the ids."""
    model, processor, frames, _ = chatty
    stream = Stream(model, processor)
    rows = []
    generate = model.generate

    def recorded(*args, **kwargs):  # every decoding step's logits (the plain path decodes every token with generate)
        out = generate(*args, **kwargs)
        rows.extend(step[0] for step in out.logits)
        return out
    model.generate = recorded
    logprobs = []
    sampled = engine.decoding(processor, temperature=1.0, max_new_tokens=12)
    for k in range(4):
        torch.manual_seed(k)
        reply = stream.turn(frames[2 * k:2 * k + 2], QUESTION if k == 0 else None, sampled, fast_silence=False)
        logprobs += reply.logprobs
        # the cache holds every id but the closing <|im_end|> and "\n", fed at the head of the next turn
        # (and, when max_new_tokens cut the reply, its last sampled id, which was never fed either)
        unfed = [reply.ids[-2]] * reply.forced_end + [stream.im_end] + processor.tokenizer.encode("\n")
        assert stream.cache.get_seq_length() == stream.cached
        assert stream.seq.ids[stream.cached:] == unfed
    with torch.no_grad():
        full = mmduet2.forward_logprobs(model, stream.seq)
    generated = [i for i, m in zip(stream.seq.ids, stream.seq.mask) if m]
    assert len(full) == len(logprobs) == len(generated)
    assert torch.allclose(full, torch.tensor(logprobs), atol=1e-4)
    # and the distributions themselves, at every position, match a full forward
    with torch.no_grad():
        logits = model(**mmduet2.model_inputs(model, stream.seq)).logits[0]
    targets = [i for i in range(1, len(stream.seq.mask)) if stream.seq.mask[i]]
    assert len(rows) == len(targets)  # one decoding step per generated token
    assert torch.allclose(torch.stack(rows), logits[[t - 1 for t in targets]], atol=1e-4)


def test_stream_with_fed_context_and_forks(chatty, monkeypatch):
    """A GRPO-style episode: gold context fed, prefilled once, forked; each fork == a full forward."""
    model, processor, frames, replies = chatty
    base = Stream(model, processor)
    base.feed(QUESTION, frames[0:1])
    base.feed(replies[0], role="assistant")
    base.feed(None, frames[1:2])
    base.feed(replies[1], role="assistant")
    base.prefill()
    assert base.cached == len(base.seq.ids)
    forward, calls = model.model.visual.forward, []
    monkeypatch.setattr(model.model.visual, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    rollout = engine.decoding(processor, temperature=1.2, top_k=10, max_new_tokens=10)
    for g in range(2):
        s = base.fork()
        lps = []
        torch.manual_seed(g)
        for k in range(2, 5):
            lps += s.turn(frames[k:k + 1], config=rollout).logprobs
        with torch.no_grad():
            full = mmduet2.forward_logprobs(model, s.seq, temperature=1.2)
        assert torch.allclose(full, torch.tensor(lps), atol=1e-4)
    assert len(calls) == 3 + 2  # one per turn's frame (the second fork reused them) + the 2 full forwards
    assert base.cache.get_seq_length() == base.cached  # forks did not touch the shared context


def test_group_rows_equal_full_forwards(chatty, monkeypatch):
    """GRPO's batched rollouts: each row of a Group (left padding, holes where a draft was rejected,
    rows that finished early) samples from exactly what a full forward over its own ids gives."""
    model, processor, frames, replies = chatty
    base = Stream(model, processor)
    base.feed(QUESTION, frames[0:1])
    base.feed(replies[0], role="assistant")
    group = engine.Group(base, 4)
    forward, calls = model.model.visual.forward, []
    monkeypatch.setattr(model.model.visual, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    check, rejected = Stream._check_draft, []

    def recorded(*args):  # how many draft tokens each row dropped, per turn
        out = check(*args)
        rejected.append(out[2])
        return out
    monkeypatch.setattr(Stream, "_check_draft", recorded)
    lps, mixed = [[] for _ in range(4)], 0
    rollout = engine.decoding(processor, temperature=1.2, top_k=10, max_new_tokens=10)
    torch.manual_seed(0)
    for k in range(1, 7):
        out = group.turn(frames[k:k + 1], config=rollout)
        mixed += len({r.silent for r in out}) == 2  # some rows silent, others replying, in one batch
        for b, r in enumerate(out):
            lps[b] += r.logprobs
    assert len(calls) == 6  # the encoder ran once per frame, for all rows
    assert mixed >= 2 and any(rejected)  # rows of one batch differed, and some row rejected part of the draft
    for b, row in enumerate(group.rows):
        assert int(group.mask[b].sum()) == row.cached  # attended columns = the row's own cached ids
        with torch.no_grad():
            full = mmduet2.forward_logprobs(model, row.seq, temperature=1.2)
        assert torch.allclose(full, torch.tensor(lps[b]), atol=1e-4)
    assert len({len(row.seq.ids) for row in group.rows}) > 1


@pytest.mark.parametrize("budget", [1, 2])
def test_group_row_keeps_a_budget_shorter_than_the_draft_as_its_stream(chatty, budget):
    """max_new_tokens below the 3 tokens of the NO REPLY draft: a Stream then decodes without the draft, and a
    Group row must too (not emit the whole accepted draft): the same ids, the same forced end, the same mask."""
    model, processor, frames, replies = chatty
    config = engine.decoding(processor, max_new_tokens=budget)  # greedy: every row equals the stream
    stream = Stream(model, processor)
    stream.feed(QUESTION, frames[0:1])
    stream.feed(replies[0], role="assistant")
    group = engine.Group(stream.fork(), 2)
    for k in range(1, 6):
        want = stream.turn(frames[k:k + 1], config=config)
        for row, got in zip(group.rows, group.turn(frames[k:k + 1], config=config)):
            assert (got.ids, got.forced_end, got.logprobs) == (want.ids, want.forced_end, pytest.approx(want.logprobs, abs=1e-4))
            assert row.seq.ids == stream.seq.ids and row.seq.mask == stream.seq.mask
    assert len(want.ids) <= budget + 1 and any(m for m in stream.seq.mask)  # a cut reply + its appended <|im_end|>
    for b, row in enumerate(group.rows):
        assert int(group.mask[b].sum()) == row.cached == stream.cached


def test_rollout_cache_under_bf16_autocast_is_bf16_and_costs_nothing(chatty, monkeypatch):
    """GRPO rolls out under bf16 autocast over fp32 weights. The KV cache is kept in bf16 there (a plain
    DynamicCache holds fp32: rope's fp32 cos/sin promote the keys, the values follow), and that changes no
    sampled id and no log-prob: attention casts its inputs to bf16 under autocast anyway."""
    from transformers import DynamicCache
    model, processor, frames, replies = chatty
    config = engine.decoding(processor, temperature=1.2, top_k=10, max_new_tokens=10)

    def rollout():
        torch.manual_seed(0)
        with torch.autocast("cpu", torch.bfloat16):
            base = Stream(model, processor)
            base.feed(QUESTION, frames[0:1])
            base.feed(replies[0], role="assistant")
            group, lps = engine.Group(base, 2), [[], []]
            assert base.cache is None  # taken over by the group, not copied beside its rows
            for k in range(1, 5):
                for b, reply in enumerate(group.turn(frames[k:k + 1], config=config)):
                    lps[b] += reply.logprobs
        return group, lps
    group, lps = rollout()
    assert {t.dtype for layer in group.cache.layers for t in (layer.keys, layer.values)} == {torch.bfloat16}
    monkeypatch.setattr(engine, "kv_cache", lambda model: DynamicCache(config=model.config))  # as before the fix
    group32, lps32 = rollout()
    assert {t.dtype for layer in group32.cache.layers for t in (layer.keys, layer.values)} == {torch.float32}
    assert [r.seq.ids for r in group.rows] == [r.seq.ids for r in group32.rows] and lps == lps32
    for b, row in enumerate(group.rows):  # and they are the training forward's under the same autocast, to bf16's precision
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            full = mmduet2.forward_logprobs(model, row.seq, temperature=1.2)
        assert (full - torch.tensor(lps[b])).abs().mean() < 0.02
    s = Stream(model, processor)  # outside autocast the cache takes the weights' dtype: fp32, as the golden tests run
    s.turn(frames[0:1], QUESTION, engine.decoding(processor, max_new_tokens=4))
    assert s.cache.layers[0].keys.dtype == torch.float32


def test_fast_silence_greedy_identical(chatty):
    """Greedy with and without fast silence: the same replies, ids and log-probs, silent or not."""
    model, processor, frames, replies = chatty
    outs = []
    for fast in (True, False):
        s = Stream(model, processor)
        outs.append([s.turn(frames[k:k + 1], QUESTION if k == 0 else None, engine.decoding(processor, max_new_tokens=16),
                            fast_silence=fast) for k in range(8)])
        outs[-1].append(s.seq.ids)
    fast_out, slow_out = outs
    assert fast_out[-1] == slow_out[-1]
    for a, b in zip(fast_out[:-1], slow_out[:-1]):
        assert a.ids == b.ids and a.text == b.text
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)
    texts = [r.text for r in fast_out[:-1]]
    assert SILENCE in texts and any(t != SILENCE for t in texts), texts  # both kinds of turn were exercised


def test_accept_draft_preserves_distribution():
    """Speculative acceptance of a fixed draft emits tokens distributed exactly as p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    torch.manual_seed(0)
    for draft in (0, 3):
        counts = torch.zeros(4)
        for _ in range(20000):
            counts[engine.accept_draft(p, draft)[0]] += 1
        assert torch.allclose(counts / counts.sum(), p, atol=0.012)


def test_fast_silence_sampling_distribution(chatty):
    """Sampling with fast silence: P(silent turn) matches the model's exact probability of NO REPLY."""
    model, processor, frames, _ = chatty
    base = Stream(model, processor)
    base.turn(frames[0:1], QUESTION, engine.decoding(processor, max_new_tokens=16))
    # exact P(NO REPLY<|im_end|>) at the next turn, from one full forward of the draft
    probe = base.fork()
    probe.seq = probe.seq + mmduet2.encode_user(processor, None, frames[2:3])
    draft = probe.draft
    probe.seq = probe.seq + Chunk(draft, [0] * len(draft), [1] * len(draft))
    with torch.no_grad():
        p_silent = mmduet2.forward_logprobs(model, probe.seq, temperature=1.5)[-len(draft):].sum().exp().item()
    torch.manual_seed(0)
    n = 300
    hot = engine.decoding(processor, temperature=1.5, max_new_tokens=8)
    for fast in (True, False):
        silent = sum(base.fork().turn(frames[2:3], config=hot, fast_silence=fast).silent for _ in range(n))
        sd = (p_silent * (1 - p_silent) / n) ** 0.5
        assert abs(silent / n - p_silent) < 4 * sd + 1e-3, (fast, silent / n, p_silent)


# ----------------------------------------------------------------------------
# A bounded context (engine.Window): after a rebuild the stream is still one full forward over its ids

def test_window_rebuild_equals_full_forward(chatty, monkeypatch):
    """A Window of 4 frames (slides of 2): after every turn, rebuilds included, the log-probs and logits of every
    token sampled since the last rebuild equal one full forward over the rebuilt sequence (system, the dropped
    turns' texts with their times, the kept turns token for token); the cache holds exactly its ids. A rebuild
    reuses the kept frames' vision features: the encoder runs once per frame."""
    model, processor, frames, _ = chatty
    frames = frames + random_frames(3, seed=9)  # 11 turns, a new frame each
    forward, encoded = model.model.visual.forward, []
    monkeypatch.setattr(model.model.visual, "forward", lambda x, grid_thw, **k: encoded.append(len(grid_thw)) or
                        forward(x, grid_thw, **k))
    window = engine.Window(Stream(model, processor), frames=4, step=2)
    rows, generate = [], model.generate

    def recorded(*args, **kwargs):  # every decoding step's logits, as in the golden test
        out = generate(*args, **kwargs)
        rows.extend(step[0] for step in out.logits)
        return out
    model.generate = recorded
    try:
        sampled = engine.decoding(processor, temperature=1.0, max_new_tokens=12)
        logprobs, seen, rebuilds, replies = [], [], 0, 0
        for k in range(11):
            torch.manual_seed(k)
            # a question in a turn that is dropped early, and one in a turn dropped late
            text = {0: QUESTION, 5: "Tell me the colour of each new shape."}.get(k)
            encoded.clear()
            reply = window.turn(frames[k:k + 1], text, sampled, fast_silence=False, t=2.0 * (k + 1))
            assert encoded == [1]  # this turn's frame only, also when the turn rebuilt the context first
            if window.rebuilds > rebuilds:  # this turn came after a rebuild: compare only what follows it
                rebuilds, logprobs, rows[:] = window.rebuilds, [], rows[-len(reply.ids) + reply.forced_end:]
            logprobs += reply.logprobs
            replies += not reply.silent
            s = window.stream
            assert s.cache.get_seq_length() == s.cached and s.seq.ids[s.cached:][-1:] == processor.tokenizer.encode("\n")
            assert sum(t.frames for t in window.turns) <= 4 and len(s.seq.pixels) == len(window.turns)
            with torch.no_grad():
                full = mmduet2.forward_logprobs(model, s.seq)
                logits = model(**mmduet2.model_inputs(model, s.seq)).logits[0]
            assert torch.allclose(full, torch.tensor(logprobs), atol=1e-4)
            targets = [i for i in range(1, len(s.seq.mask)) if s.seq.mask[i]]
            assert len(rows) == len(targets)
            assert torch.allclose(torch.stack(rows), logits[[i - 1 for i in targets]], atol=1e-4)
            seen.append(s.seq)
    finally:
        model.generate = generate
    # turns 1-4 fill the window; turns 5, 7, 9, 11 each first rebuild it with the last 2 frames
    assert window.rebuilds == 4 and window.dropped_frames == 8 and sum(t.frames for t in window.turns) == 3 and replies > 0
    memory = processor.tokenizer.decode(seen[-1].ids)
    assert "Earlier in this stream" in memory and f"[00:02] User: {QUESTION}" in memory  # turn 1's question, at 2 s
    assert "[00:12] User: Tell me the colour of each new shape." in memory  # turn 6's too: dropped at turn 9


def test_window_memory_keeps_questions_first_and_says_what_it_dropped(chatty):
    """The dropped turns' texts within memory_tokens: questions before replies, the newest first, each kept one with
    its time; what no longer fits is counted in the memory's last line, and never comes back."""
    model, processor, _, _ = chatty
    window = engine.Window(Stream(model, processor), frames=2, memory_tokens=120)
    tok = processor.tokenizer
    window.memory = [(2.0, "user", "Tell me the colour of each new shape.")] + \
        [(4.0 * k, "assistant", f"A red square appeared on the left {k}.") for k in range(1, 9)]
    text = window._memory_text()
    assert len(tok(text)["input_ids"]) <= 120
    assert "[00:02] User: Tell me the colour of each new shape." in text  # the question stays
    kept = [m for m in window.memory if m[1] == "assistant"]
    assert 0 < len(kept) < 8 and kept == [(4.0 * k, "assistant", f"A red square appeared on the left {k}.")
                                          for k in range(9 - len(kept), 9)]  # the latest replies
    assert text.endswith(f"({8 - len(kept)} earlier replies are no longer shown.)")
    assert window.hidden == {"user": 0, "assistant": 8 - len(kept)}
    again = window._memory_text()  # nothing new: the same memory
    assert again == text
    # a question asked again and again is kept once, at its latest time; many questions take at most half
    window.memory += [(40.0 + k, "user", "Tell me the colour of each new shape.") for k in range(5)] + \
        [(50.0 + k, "user", f"Where is shape number {k} now?") for k in range(6)] + [(60.0, "assistant", "Blue.")]
    window.memory_tokens = 240
    text = window._memory_text()
    assert len(tok(text)["input_ids"]) <= 240 and text.count("Tell me the colour") <= 1
    assert "[01:00] You said: Blue." in text and "[00:55] User: Where is shape number 5 now?" in text
    assert window.hidden["user"] > 0  # the oldest questions went, for the latest replies
