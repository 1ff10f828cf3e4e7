"""The streaming engine: a proactive chat kept in a KV cache, one user turn at a time (docs/streaming.md).

infer.py streams a video through a `Stream`; grpo.py decodes an episode's G rollouts as one `Group`. Feed
a user turn (frames, optional text), get the assistant turn back (a reply or NO REPLY) with its exact ids.
Our code is the prefill (new frames and text at explicit 3-D positions, through mmduet2.py's template and
rope); decoding is transformers' `generate` with a `GenerationConfig` (`decoding`).

Read `Stream.turn` first: its plain path is the whole idea. Two optimisations follow, each marked: fast
silence (the NO REPLY draft checked in the same forward as the user turn) and `Group` (G streams as one
batch). Both are ours, in neither the paper nor the released code; they change the cost only (greedy: the
same ids; sampled: the same distribution), and tests/test_engine.py holds both to the plain path. Last, `Window`: a Stream whose
context keeps at most N frames, for a camera that does not end (infer.py --context-frames; docs/live.md);
it changes what the model sees, so it is off for training and, unless asked, for a benchmark.

Randomness: sampling uses torch's default generator of the model's device (`generate` takes no generator,
and our draft check draws from the same one), so `torch.manual_seed(s)` before a turn makes it
reproducible on a CPU and on a GPU alike. GRPO seeds it per step from (seed, step, rank).

Paper: Sec. 4.1 (a video as a multi-turn chat) and 4.3 (G rollouts per episode). To watch it work:
    python infer.py --demo                          # a toy video through toy-model/, turn by turn
    python -m pytest tests/test_engine.py -q        # each path held to one full forward over the ids
"""
import copy
import hashlib
import time
from dataclasses import dataclass

import torch

from mmduet2 import (ENDOFTEXT, IM_END, SILENCE, SYSTEM_PROMPT, Chunk, _image_tokens, _tokenize, clock, encode_assistant,
                     encode_system, encode_user, is_silent, model_inputs, rope_positions, token_logprobs)


@dataclass
class Reply:
    """One assistant turn: its text and the exact ids the model produced (ending in <|im_end|>)."""
    text: str
    ids: list
    # log p of each produced id under softmax(logits / T), before top-k: GRPO logs the gap to its
    # training forward, and the golden tests compare them to a full forward
    logprobs: list
    forced_end: bool = False  # max_new_tokens cut the reply: <|im_end|> was appended, not produced

    @property
    def silent(self):
        return is_silent(self.text)


def decoding(processor, temperature=0.0, top_k=None, max_new_tokens=100):
    """The GenerationConfig of an assistant turn: greedy at temperature 0 (the paper's inference),
    sampled otherwise (GRPO rollouts: T 1.2, top-k 10, <= 100 new tokens).

    It stops at <|im_end|>, the end of an assistant turn, and sets every knob itself, so a turn
    decodes the same way whatever checkpoint it runs (docs/streaming.md, pitfall 7).
    """
    from transformers import GenerationConfig
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    # all knobs given: `generate` would otherwise fill them in from the checkpoint's
    # generation_config.json (Qwen2.5-VL ships top_p 0.001, repetition_penalty 1.05, ...)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=1.0) if temperature else \
        dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)  # greedy: transformers' neutral values
    return GenerationConfig(
        **sampling, repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=im_end,
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),  # what a batch row gets once it has ended
        return_dict_in_generate=True, output_logits=True)  # raw logits: the log-probs of what was sampled


def kv_cache(model):
    """An empty KV cache whose keys and values are kept in the dtype attention computes in: the model's, or
    the autocast dtype when made under autocast (GRPO's rollouts: bf16 over fp32 weights). There a plain
    DynamicCache would hold fp32 (rope's fp32 cos/sin promote the keys, the values follow): twice the memory,
    cast back to bf16 at every decoding step (docs/streaming.md, pitfall 8). Storing bf16 rounds exactly what
    attention rounds anyway.
    """
    from transformers import DynamicCache
    device = model.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype

    class Cache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)
    return Cache(config=model.config)


def _vision_key(chunk):
    """A chunk's frames, as the key of the vision dict: their pixels and grids, hashed."""
    return hashlib.blake2b(b"".join(p.numpy().tobytes() for p in chunk.pixels) + str(chunk.grids).encode()).digest()


def _budget(config, max_new_tokens):
    """A copy of `config` that stops after `max_new_tokens` (what is left of a turn's budget)."""
    config = copy.copy(config)
    config.max_new_tokens = max_new_tokens
    return config


def _sampled_logprobs(logits, ids, config):
    """generate's raw logits (one (B, V) per step) → log p of the produced ids under softmax(logits / T)."""
    steps = [token_logprobs(step, ids[:, k], config.temperature) for k, step in enumerate(logits)]  # (B,) each
    return torch.stack(steps, 1).tolist() if steps else [[] for _ in range(len(ids))]


class Stream:
    """A proactive conversation kept in a KV cache, one user turn at a time.

    Invariants: `seq` holds every token so far (ids, mask, pixels, grids); the KV cache holds
    `seq.ids[:cached]`, and what lies after it is pending, fed at the head of the next chunk;
    `pos` is the next rope position. So the cache always equals the ids, and the golden test
    (tests/test_engine.py) holds every logit to one full forward over them.
    """

    def __init__(self, model, processor, system=SYSTEM_PROMPT):
        self.model, self.processor, self.system = model, processor, system
        self.im_end = processor.tokenizer.convert_tokens_to_ids(IM_END)
        self.draft = _tokenize(processor, SILENCE + IM_END).ids  # "NO REPLY<|im_end|>", for fast silence
        self.seq = encode_system(processor, system)  # the system turn: pending until the first turn feeds it
        # cached: how many of seq.ids the cache holds; pos: not the same count, as an image's tokens
        # advance the rope position by its grid, not by its length
        self.cache, self.cached, self.pos = kv_cache(model), 0, 0
        self.vision = {}  # frames' vision-encoder outputs by pixel content (shared by forks and a Group's rows)

    # -- the plain path ------------------------------------------------------------------------

    def turn(self, frames=(), text=None, config=None, fast_silence=True):
        """Feed one user turn (1–2 frames, optional text) and return the assistant's Reply.

        config: a `decoding(...)` GenerationConfig (default: greedy, <= 100 new tokens).
        fast_silence: try the NO REPLY draft first (`_fast_turn`); same output, cheaper silent turns.
        """
        config = config or decoding(self.processor)
        # the user turn ends in the assistant header: the model answers every turn (Sec. 4.1)
        self.seq = self.seq + encode_user(self.processor, text, frames, self.system)
        if fast_silence and config.max_new_tokens >= len(self.draft):  # the draft must fit in the budget
            return self._fast_turn(config)
        pending = self._pending()  # the reply's prompt: "<|im_end|>\n" left from the last turn + this turn
        # all but its last token ("\n" after "assistant") into the cache, by hand: images only ever go
        # through our prefill, since `generate` with a kept cache and new images fails (pitfall 4)
        self._forward(pending.head(-1))
        out, logps = self._generate(pending.ids[-1], config)  # then `generate` from that token
        return self._close(out, logps)

    def _generate(self, token, config, out=(), logps=()):
        """`generate` a reply from `token` (the last id not yet in the cache), after `out` already produced.
        The cache is `generate`'s to extend; it stops on <|im_end|> or when the turn's budget is spent."""
        out, logps = list(out), list(logps)
        left = config.max_new_tokens - len(out)  # fast silence may have produced some tokens already
        if left <= 0 or (out and out[-1] == self.im_end):
            return out, logps
        dev = self.model.device
        gen = self.model.generate(
            input_ids=torch.tensor([[token]], device=dev), past_key_values=self.cache,
            attention_mask=torch.ones(1, self.cached + 1, dtype=torch.long, device=dev),  # cache + this token
            # positions from `pos` on, text only, so the three rope axes step together (generate adds 1
            # per token). Left to itself it would derive them from `rope_deltas` state that a cached
            # multi-image stream makes stale (docs/streaming.md, pitfall 1).
            position_ids=torch.full((3, 1, 1), self.pos, device=dev),  # (t, h, w) × batch 1 × 1 token
            generation_config=_budget(config, left))
        new = gen.sequences[0, 1:].tolist()  # (n,): the produced ids, after the input token
        # fed: `token` + new[:-1]. The last id (<|im_end|>, or the last one the budget allowed) is never
        # fed: it stays pending with the template's "\n" (pitfall 5)
        self.cached += len(new)
        self.pos += len(new)
        return out + new, logps + _sampled_logprobs(gen.logits, gen.sequences[:, 1:], config)[0]

    def _close(self, out, logps):
        """Append the assistant turn to `seq` (mask 1 on what the model produced) and return it as a Reply."""
        forced = out[-1] != self.im_end
        ids = out + [self.im_end] * forced  # a cut reply still closes its turn (not trained: mask 0)
        # the mask marks exactly the policy's tokens, <|im_end|> included: GRPO trains on these ids
        # as they were sampled, never on re-tokenized text
        self.seq = self.seq + Chunk(ids, [0] * len(ids), [1] * len(out) + [0] * forced) + _tokenize(self.processor, "\n")
        text = self.processor.tokenizer.decode(out, skip_special_tokens=True)
        return Reply(text, ids, logps, forced)

    @torch.no_grad()
    def _forward(self, chunk, keep=1):
        """The hand-written prefill: feed a chunk (its images too) into the cache with explicit positions;
        return the last `keep` positions' logits (keep, V)."""
        kw = model_inputs(self.model, chunk, self.pos)  # positions continue from where the cache ends
        if chunk.pixels:  # vision features instead of pixels, so that copies of this stream encode a frame once
            del kw["pixel_values"]
            kw["mm_encoder_outputs"] = {"image": self._vision(chunk)}
        out = self.model(**kw, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.pos = int(kw["position_ids"].max()) + 1  # images advance the position by their grid, not their length
        self.cached += len(chunk.ids)
        return out.logits[0]

    def _pending(self):
        """Everything in `seq` that the cache does not hold yet, with the pixels of its images."""
        s, c = self.seq, self.cached
        n_cached = sum(s.mm_types[:c])  # image tokens already in the cache
        # the cache always ends in text, never inside an image: an image is pending whole or not at all
        pixels, grids, seen = [], [], 0
        for p, g in zip(s.pixels, s.grids):
            if seen >= n_cached:
                pixels.append(p), grids.append(g)
            seen += _image_tokens(g)
        return Chunk(s.ids[c:], s.mm_types[c:], s.mask[c:], pixels, grids)

    def _vision(self, chunk):
        """The vision encoder's output for a chunk's frames, computed once per pixel content and kept in a
        dict that forks and a Group's rows share (the last 64: a GRPO segment's turns; a live stream never repeats)."""
        key = _vision_key(chunk)
        if key not in self.vision:
            if len(self.vision) >= 64:
                self.vision.pop(next(iter(self.vision)))  # the oldest (dicts keep insertion order)
            dev = self.model.device
            out = self.model.model.get_image_features(torch.cat(chunk.pixels).to(dev, self.model.dtype),
                                                      torch.tensor(chunk.grids, device=dev), return_dict=True)
            out.last_hidden_state = None  # only the merged tokens (pooler_output) go into the LLM
            self.vision[key] = out
        return self.vision[key]

    # -- turns the model does not produce ------------------------------------------------------

    def feed(self, text=None, frames=(), role="user"):
        """Append a turn the model does not produce (e.g. the gold context of a GRPO episode).
        Fed assistant turns get mask 0: in a stream the mask marks only what the policy generated."""
        if role == "assistant":
            turn = encode_assistant(self.processor, text, self.system)
            turn.mask = [0] * len(turn.ids)
            self.seq = self.seq + turn
        else:  # no assistant header: the next turn (fed or produced) brings its own
            self.seq = self.seq + encode_user(self.processor, text, frames, self.system, generation_prompt=False)

    def prefill(self):
        """Encode everything not yet cached: e.g. a GRPO episode's shared context, once for the group."""
        if self.cached < len(self.seq.ids):
            self._forward(self._pending())

    def fork(self):
        """An independent copy (its own cache) sharing everything encoded so far, e.g. to try a turn two ways."""
        other = copy.copy(self)  # `seq` is shared safely: Chunks are never changed in place, only replaced
        other.cache = copy.deepcopy(self.cache)
        return other

    # -- optimisation 1: fast silence ----------------------------------------------------------

    def _fast_turn(self, config):
        """`turn` with the NO REPLY draft riding along with the user turn in the same forward pass.

        Most turns are silent, and silence is a known string: an accepted draft makes a silent turn
        one forward. The output is distributed as the plain path's (greedy: identical).
        `generate` cannot do this for us: it verifies drafts only from an assistant model or prompt lookup.
        """
        draft = Chunk(self.draft, [0] * len(self.draft), [0] * len(self.draft))
        # pending + draft in one forward; logits row i predicts draft[i] (row 0 sits on the header's "\n")
        logits = self._forward(self._pending() + draft, len(self.draft) + 1)  # (len(draft) + 1, V)
        out, logps, rejected = self._check_draft(logits, config)
        # the draft tokens after the first rejected one were fed but are not the turn: crop them
        if rejected:
            self.cache.crop(-rejected)
        self.cached, self.pos = self.cached - rejected, self.pos - rejected  # draft tokens are text: 1 position each
        # rejected: `generate` goes on from the model's own token (out[-1], not fed yet);
        # accepted: out ends in <|im_end|> (fed with the draft) and _generate returns at once
        out, logps = self._generate(out[-1], config, out, logps)
        return self._close(out, logps)

    def _check_draft(self, logits, config):
        """Walk the draft's logits (row i predicts the token after draft[:i]) as far as the model agrees. Returns
        the tokens emitted (the accepted draft, then the model's own choice where it disagreed), their log-probs,
        and how many draft tokens the cache must drop."""
        out, logps = [], []
        for i, row in enumerate(logits):
            if config.do_sample:  # speculative acceptance: the emitted token is distributed as a sample
                tok, accepted = accept_draft(_sampling_probs(row, config), self.draft[i])
            else:  # greedy accepts exactly when the draft token is the argmax
                tok = int(row.argmax())
                accepted = tok == self.draft[i]
            out.append(tok)
            logps.append(float(token_logprobs(row[None], torch.tensor([tok], device=row.device), config.temperature)))
            if not accepted:
                return out, logps, len(self.draft) - i  # keep draft[:i] in the cache, drop the rest
            if tok == self.im_end:
                return out, logps, 0  # the whole draft, <|im_end|> included, is the turn


# -- optimisation 1, continued: the acceptance rule, as plain functions (a test checks its distribution)

def _sampling_probs(logits, config):
    """The distribution `generate` samples from: softmax(logits / T) over the top-k (TopKLogitsWarper's rule)."""
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]  # the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with it stay in, as in transformers
    return torch.softmax(logits, -1)


def accept_draft(probs, token):
    """Speculative acceptance of a fixed draft token: returns (token actually emitted, accepted).
    The emitted token is distributed exactly as `probs`, whatever the draft."""
    # the draft is deterministic (q = one-hot on `token`), so "accept with min(1, p/q)" is "accept
    # with probability p(token)"
    if torch.rand((), device=probs.device) < probs[token]:
        return token, True
    # on rejection, sample from the residual max(0, p − q), which is ∝ p with `token` removed
    residual = probs.clone()
    residual[token] = 0.0
    return int(torch.multinomial(residual / residual.sum(), 1)), False


# ----------------------------------------------------------------------------
# Optimisation 2: batched rows

class _OnlyEnd:
    """A logits processor for `generate`: rows in `done` may only emit <|im_end|> (a batch row whose
    turn already ended, e.g. on an accepted NO REPLY draft, ends at once instead of rambling on)."""

    def __init__(self, done, im_end):
        self.done, self.im_end = done, im_end  # (G,) bool on the model's device

    def __call__(self, input_ids, scores):  # scores: (G, V)
        end = torch.full_like(scores, float("-inf"))
        end[:, self.im_end] = 0.0  # a distribution with all its mass on <|im_end|>
        return torch.where(self.done[:, None], end, scores)


class Group:
    """Optimisation 2: the G rollouts of a GRPO episode decoded as one batch (grpo.py's rollouts).

    The rows share the context the base stream has encoded (the group takes the base's cache over: fork a
    base to keep it). From there every user turn is one forward for all rows and every reply one `generate`
    call. Each row is a Stream without a cache of its own (its `seq`, `cached`, `pos` are its own); the group
    holds one KV cache of batch G and an attention mask (G, cache length) that is 0 where a column is not the
    row's own token. Positions are per row and count only the row's own tokens, so each row computes exactly
    what its own Stream would; tests/test_engine.py holds every row to a full forward over its own ids.
    """

    def __init__(self, base, n):
        base.prefill()  # the shared context, encoded once before it is copied
        self.model, self.im_end = base.model, base.im_end
        self.rows = [copy.copy(base) for _ in range(n)]  # share the encoded context and the vision features
        # the base's cache is taken over, not copied: the base is not used after its group is made, and a copy would
        # keep a row of context beside the G (0.4 GiB at 3B for a 90-frame episode)
        self.cache, base.cache = base.cache, None
        self.cache.batch_repeat_interleave(n)  # (1, heads, C, d) → (G, heads, C, d) per layer
        self.mask = torch.ones(n, base.cached, dtype=torch.long, device=base.model.device)  # (G, C)
        for row in self.rows:
            # the group's cache is the only one; a row's `cached` now counts its own tokens in it, which
            # is fewer than the cache's columns once the row has holes
            row.cache = None

    def turn(self, frames=(), text=None, config=None):
        """Stream.turn for every row at once, with fast silence where Stream.turn takes it; returns the G Replies."""
        row0 = self.rows[0]
        config = config or decoding(row0.processor)
        user = encode_user(row0.processor, text, frames, row0.system)  # tokenized once for all rows
        for row in self.rows:
            row.seq = row.seq + user
        # each row's pending tokens differ ("<|im_end|>\n" after a reply, "\n" after an accepted draft)
        pending = [row._pending() for row in self.rows]
        if config.max_new_tokens < len(row0.draft):
            # Stream.turn's plain path: a draft longer than the budget would overrun it. All but each row's last
            # pending token into the cache, then `generate` from that token.
            self._forward([p.head(-1) for p in pending], 1)
            outs, logps = self._generate([[] for _ in pending], [[] for _ in pending], config, [p.ids[-1] for p in pending])
            return [row._close(out, lp) for row, out, lp in zip(self.rows, outs, logps)]
        draft = Chunk(row0.draft, [0] * len(row0.draft), [0] * len(row0.draft))
        logits = self._forward([p + draft for p in pending], len(draft.ids) + 1)  # (G, len(draft)+1, V)
        outs, logps = [], []
        for b, row in enumerate(self.rows):
            out, lp, rejected = row._check_draft(logits[b], config)
            # a Stream crops a rejected draft, but one row of a batched cache cannot be cropped: its
            # tail becomes a hole instead. Left padding puts the draft at the right end of every row,
            # so the hole is the mask's last columns. Positions step back as in Stream._fast_turn.
            if rejected:
                self.mask[b, -rejected:] = 0
                row.cached, row.pos = row.cached - rejected, row.pos - rejected
            outs.append(out), logps.append(lp)
        outs, logps = self._generate(outs, logps, config)
        return [row._close(out, lp) for row, out, lp in zip(self.rows, outs, logps)]

    @torch.no_grad()
    def _forward(self, chunks, keep):
        """Feed one chunk per row, left-padded into one block; return each row's last `keep` logits."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        n = max(len(c.ids) for c in chunks)
        ids, pos, mask, features = [], [], [], []
        for row, c in zip(self.rows, chunks):
            # left padding aligns every row on its last token, so `keep` logits are the same places in
            # each; the pads become masked columns of the cache
            pad = n - len(c.ids)
            p = rope_positions(self.model, c, row.pos)  # (3, 1, len): this row's own positions
            ids.append([self.im_end] * pad + c.ids)  # any id: padding is masked out
            pos.append(torch.nn.functional.pad(p, (pad, 0)))  # (3, 1, n); pads get position 0, never attended
            mask.append([0] * pad + [1] * len(c.ids))
            if c.pixels:  # image tokens are filled in batch order: row 0's frames first
                features += row._vision(c).pooler_output  # the rows share one dict: computed for row 0 only
            row.pos, row.cached = int(p.max()) + 1, row.cached + len(c.ids)
        dev = self.model.device
        self.mask = torch.cat([self.mask, torch.tensor(mask, device=dev)], 1)  # (G, C + n)
        kw = dict(input_ids=torch.tensor(ids, device=dev), position_ids=torch.cat(pos, 1).to(dev),  # (3, G, n)
                  attention_mask=self.mask)
        if features:  # as Stream._forward: vision features in place of pixels
            kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return self.model(**kw, past_key_values=self.cache, use_cache=True, logits_to_keep=keep).logits

    def _generate(self, outs, logps, config, unfed=None):
        """One `generate` call continues every row whose reply is still open; the others may only end.

        unfed: each row's token not in the cache yet, fed first (default: the last one the row produced).
        """
        unfed = unfed or [out[-1] for out in outs]
        budget = [config.max_new_tokens - len(out) for out in outs]  # what each row has left
        live = [(not out or out[-1] != self.im_end) and left > 0 for out, left in zip(outs, budget)]
        if not any(live):
            return outs, logps  # every row silent (or out of budget): no `generate` at all
        dev, G = self.model.device, len(self.rows)
        # `generate` feeds every row every step, so rows that already ended get columns they never
        # produced: _OnlyEnd ends them at once, and their columns are masked out below
        gen = self.model.generate(
            input_ids=torch.tensor([[token] for token in unfed], device=dev),  # (G, 1): each row's unfed token
            past_key_values=self.cache, attention_mask=torch.cat([self.mask, self.mask.new_ones(G, 1)], 1),
            # each row from its own position, the three rope axes together (text only)
            position_ids=torch.tensor([row.pos for row in self.rows], device=dev).view(1, G, 1).expand(3, G, 1),
            logits_processor=[_OnlyEnd(~torch.tensor(live, device=dev), self.im_end)],
            # the longest budget left; a row with less is cut to its own below
            generation_config=_budget(config, max(b for b, on in zip(budget, live) if on)))
        new = gen.sequences[:, 1:]  # (G, steps): each row's ids, then padding once it ended
        new_lp = _sampled_logprobs(gen.logits, new, config)
        columns = torch.zeros(G, new.shape[1], dtype=torch.long, device=dev)  # the cache grew by `steps` columns
        for b, row in enumerate(self.rows):
            if not live[b]:
                continue  # its columns stay masked out
            ids = new[b, :budget[b]].tolist()
            n = ids.index(self.im_end) + 1 if self.im_end in ids else len(ids)  # its reply ends here (or is cut)
            outs[b], logps[b] = outs[b] + ids[:n], logps[b] + new_lp[b][:n]
            # column k holds the token fed at step k: the input, then ids[0], ...; so the row's first
            # n columns are its own tokens, the input + ids[:n-1], and its last id stays pending, as in a Stream
            columns[b, :n] = 1
            row.cached, row.pos = row.cached + n, row.pos + n
        self.mask = torch.cat([self.mask, columns], 1)  # (G, C + steps)
        return outs, logps


# ----------------------------------------------------------------------------
# Live for hours: a bounded context (infer.py --context-frames; not in the paper, whose evaluation feeds files whole)

MEMORY_TOKENS = 256  # the text kept from turns whose frames were dropped: at most this many tokens


@dataclass
class _Turn:
    """One turn in a Window's context: its time, user text, reply, frame count, and its tokens as fed."""
    t: float
    text: str       # the user's text in this turn ("" when none)
    reply: str      # the assistant's text (NO REPLY too)
    frames: int
    chunk: Chunk    # the user turn (frames, text, assistant header), the reply's ids, "\n": exactly as the model saw it


class Window:
    """A Stream that keeps at most `frames` frames in its context, for a stream with no end (a camera).

    A plain Stream keeps every frame: a live camera at the paper's settings adds ~4,000 tokens a minute to
    the KV cache, every turn attends over all of it, and the rope positions pass what the model was trained
    on. A Window slides in steps: when a turn would bring more than `frames` frames into the context, the
    oldest turns go, leaving at most `frames - step` frames (step: frames // 2 by default), and the context is
    rebuilt as one sequence:

        system | a user turn: the dropped turns' texts with their times | the kept turns, token for token

    then encoded in one forward from position 0, so its cache and positions are exactly those of one full
    forward over that sequence (tests/test_engine.py holds every logit after a rebuild to it). The kept turns
    are their own ids (frames, questions, replies, NO REPLY turns), not re-tokenized text. The dropped turns
    keep their questions and their replies as text, within MEMORY_TOKENS: the questions first (a proactive
    question stays open for the whole stream: it asks for replies as the video goes), then the latest
    replies; what does not fit is dropped, and the memory says how many replies and questions it no longer
    shows. With step = frames / 2, a rebuild comes every frames / 2 frames and costs one LLM forward over about
    frames / 2 frames (their vision features are reused: each frame goes through the LLM at most twice and
    through the vision encoder once); docs/live.md has the measured cost.
        frames 90, 2 per turn: turns 1-45 as a Stream; turn 46 first rebuilds (turns 24-45 kept: 44 frames)
    """

    def __init__(self, stream, frames, step=None, memory_tokens=MEMORY_TOKENS):
        assert stream.cached == 0 and not stream.seq.pixels, "a Window starts from a fresh Stream"
        self.stream, self.frames = stream, frames
        self.step = step or max(1, frames // 2)
        self.memory_tokens = memory_tokens
        self.turns = []     # _Turn, oldest first: the turns whose frames are in the context
        self.memory = []    # (t, role, text) kept from dropped turns, oldest first (pruned to what fits)
        self.hidden = {"user": 0, "assistant": 0}  # texts of dropped turns the memory no longer shows
        self.rebuilds, self.rebuild_s, self.dropped_frames = 0, [], 0

    def turn(self, frames=(), text=None, config=None, fast_silence=True, t=0.0):
        """Stream.turn, within the window: slide first if this turn's frames would not fit. t: the turn's
        stream time (kept with its text, for the memory of a later rebuild)."""
        if self.turns and sum(x.frames for x in self.turns) + len(frames) > self.frames:
            self._slide()
        s = self.stream
        n_ids, n_images = len(s.seq.ids), len(s.seq.pixels)
        reply = s.turn(frames, text, config, fast_silence)
        seq = s.seq  # the turn is what the stream appended: its user chunk, the reply ids, "\n"
        chunk = Chunk(seq.ids[n_ids:], seq.mm_types[n_ids:], [0] * (len(seq.ids) - n_ids),  # mask 0: fed, not sampled
                      seq.pixels[n_images:], seq.grids[n_images:])
        self.turns.append(_Turn(t, text or "", reply.text.strip(), len(frames), chunk))
        return reply

    def _slide(self):
        """Drop the oldest turns (at most frames - step frames stay), keep their texts, and rebuild the cache."""
        tic = time.perf_counter()
        kept, n = [], 0
        for turn in reversed(self.turns):  # the newest turns that fit in frames - step
            if n + turn.frames > self.frames - self.step:
                break
            kept.insert(0, turn)
            n += turn.frames
        for turn in self.turns[:len(self.turns) - len(kept)]:
            self.dropped_frames += turn.frames
            if turn.text:
                self.memory.append((turn.t, "user", turn.text))
            if not is_silent(turn.reply):
                self.memory.append((turn.t, "assistant", turn.reply))
        self.turns = kept
        old = self.stream
        s = self.stream = Stream(old.model, old.processor, old.system)
        s.vision = old.vision  # the encoder outputs of frames seen recently (the last turns' keys)
        seq = s.seq  # the system turn
        if self.memory:
            seq = seq + encode_user(s.processor, self._memory_text(), (), s.system, generation_prompt=False)
        for turn in kept:
            seq = seq + turn.chunk
        s.seq = seq
        old.cache = None  # let the old cache go before the new one is built (at 3B a 90-frame cache is ~0.5 GB)
        # the kept frames' encoder outputs come from their own turns (the vision dict holds the last 64 turns'),
        # so a rebuild runs the LLM over them again but not the vision encoder; put under the whole chunk's key
        # for the prefill to find, and taken out after: it is never asked for again
        pending = s._pending()
        if pending.pixels:
            from transformers.modeling_outputs import BaseModelOutputWithPooling
            features = [x for turn in kept if turn.chunk.pixels for x in s._vision(turn.chunk).pooler_output]
            s.vision[_vision_key(pending)] = BaseModelOutputWithPooling(pooler_output=features)  # one (tokens, d) a frame
        s.prefill()  # one forward from position 0: the positions of one full forward over `seq`
        if pending.pixels:
            s.vision.pop(_vision_key(pending))
        self.rebuilds += 1
        self.rebuild_s.append(time.perf_counter() - tic)

    def _memory_text(self):
        """The dropped turns' texts that fit in memory_tokens, oldest first, each with its stream time; prunes
        self.memory to them (what does not fit now never will: newer texts only come in front of it).
            [00:00] User: Tell me whenever a new shape appears.
            [01:30] You said: A red square appeared on the left.
        Questions come first but may take only half the memory (past it, the oldest question goes before a
        reply), so repeated questions cannot push out every reply; a text said again is kept once, at its
        latest time.
        """
        tok = self.stream.processor.tokenizer
        clip = self.memory_tokens // 4  # one long text cannot take the whole memory
        questions, replies, seen = [], [], set()  # each newest first: the order in which they are given up last
        for t, role, text in reversed(self.memory):
            if (role, text) in seen:
                continue  # said again later: the later one stands for it
            seen.add((role, text))
            ids = tok(text)["input_ids"]
            text = text if len(ids) <= clip else tok.decode(ids[:clip]).strip() + "..."
            line = f"[{clock(t)}] {'User' if role == 'user' else 'You said'}: {text}"
            (questions if role == "user" else replies).append((t, role, text, line, len(tok(line + "\n")["input_ids"])))
        hidden = dict(self.hidden)
        while True:
            keep = sorted(questions + replies, key=lambda x: x[0])  # stable: a question before its own turn's reply
            note = [f"({n} earlier {'questions' if role == 'user' else 'replies'} are no longer shown.)"
                    for role, n in hidden.items() if n]
            text = "\n".join(["Earlier in this stream (these frames are no longer shown):"] + [x[3] for x in keep] + note)
            if len(tok(text)["input_ids"]) <= self.memory_tokens or not keep:
                break
            # the oldest reply goes, unless the questions hold more than half the memory: then the oldest question
            over = sum(x[4] for x in questions) > self.memory_tokens // 2 and len(questions) > 1
            gone = (questions if over or not replies else replies).pop()
            hidden[gone[1]] += 1
        self.memory, self.hidden = [x[:3] for x in keep], hidden
        return text
