"""The memory of a full-scale training step without a GPU: Qwen2.5-VL-3B on fake tensors, and a probe that counts the
bytes a step keeps for backward and holds at its peak (`tools/bench.py memory` builds its table on them).

Fake tensors have shapes, dtypes and storages but no data, so a 3B step runs on a laptop in seconds; autograd,
autocast and checkpointing still run as they do on a GPU. How the numbers compare with a real card:
docs/performance.md, item 4 (memory).
Paper: what one GPU holds in its full-scale runs (Qwen2.5-VL-3B; SFT Sec. 4.2 on 16 H800s, GRPO Sec. 4.3 on 8).
    python tools/bench.py memory          # the table in docs/full-scale.md, in ~30 s on a CPU
"""
import collections
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mmduet2
import runs


def gpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention as it runs on a GPU in our training forward, for fake tensors. On a GPU torch
    picks a fused kernel, which saves q, k, v, its output and the log-sum-exp for backward, never the (heads, L, L)
    attention matrix; on fake tensors it cannot ask a GPU which kernel fits and falls back to the math path (which
    saves that matrix, in fp32), so we call the flash kernel ourselves: its meta function gives the GPU's shapes and
    saved tensors."""
    assert attention_mask is None, "with a padding mask sdpa picks another kernel than the one modelled here"
    device = query.device.type  # no padding mask: sdpa gets is_causal=True and the 2 KV heads as they are (enable_gqa)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype  # autocast: bf16
    out = torch.ops.aten._scaled_dot_product_flash_attention(  # q (1, 16, L, 128), k and v (1, 2, L, 128)
        query.to(dtype), key.to(dtype), value.to(dtype), dropout_p=dropout, is_causal=True, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None  # (1, 16, L, 128) → (1, L, 16, 128), as transformers' sdpa


def fake_3b(config, device="cpu"):  # device="cuda": a fake GPU model, for forwards only
    """Qwen2.5-VL-3B on fake tensors, set up as sft.py trains it: fp32 weights, ViT frozen, merger + LLM trained.
    Fake tensors (torch's FakeTensorMode) are meta tensors, with shapes, dtypes and storages but no data, that claim
    a device; every op still goes through autograd, autocast and checkpointing. We claim the CPU: on a fake GPU the
    backward needs a real one (the autograd engine asks CUDA for a context), and torch.autocast("cuda") switches
    itself off without one. CPU autocast makes the same casts on this model: its bf16 ops are linear, matmul, conv
    and sdpa there too, and the norms cast to fp32 in the model's own code (tests/test_bench.py checks that a
    fake-GPU forward saves the same bytes)."""
    from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("gpu_sdpa", gpu_attention)
    AttentionMaskInterface.register("gpu_sdpa", sdpa_mask)  # the masks sdpa gets: None for an unpadded causal forward
    with torch.device("meta"):  # no memory and no initialisation, even for the 151,936 × 2,048 embedding
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="gpu_sdpa")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gave lm_head a copy of the embedding; the checkpoint ties them
        runs.trainable(model, grad_checkpointing=True)  # as sft.py: fp32 gradients up front, DDP's bucket views
    return model.train()


class Probe(TorchDispatchMode):
    """Bytes of one training step on fake tensors, counted per storage (a view and its base are one allocation) and
    per `part` of the step (set by module hooks). Storages in `known` (weights, buffers, gradients) exist before it.
    - saved: `pack`, a saved_tensors_hooks pack hook, sees every tensor autograd keeps for backward (non-reentrant
      checkpointing hides what a checkpointed layer saves behind its own hooks: we see only the layer's input).
    - live: as a dispatch mode it sees every op's outputs, and a finalizer on each new storage when it is freed
      (torch keeps one Python object per storage while it lives). The most bytes alive at once (also per `phase`)
      is what the step adds to the weights, gradients and Adam state."""

    def __init__(self, model):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]
                      + [p.grad for p in model.parameters() if p.grad is not None]}
        self.part, self.phase = "outside", "forward"
        self.saved, self.now, self.peak = collections.Counter(), collections.Counter(), collections.Counter()
        self.kept, self.live = {}, {}  # storage address -> its part, while the storage lives

    def _add(self, table, tensor):
        """Enter the tensor's storage in table, once while it lives; its bytes if it is new there, else 0."""
        s = tensor.untyped_storage()
        if s._cdata in self.known or s._cdata in table:
            return 0
        table[s._cdata] = self.part
        weakref.finalize(s, self._free, table, s._cdata, s.nbytes()).atexit = False
        return s.nbytes()

    def _free(self, table, key, nbytes):
        if table is self.live:
            self.now[table[key]] -= nbytes
        del table[key]

    def pack(self, tensor):
        self.saved[self.part] += self._add(self.kept, tensor)
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.now[self.part] += self._add(self.live, t)
        now = sum(self.now.values())
        if func is torch.ops.aten.add.Tensor and self.phase == "backward" and not torch.is_grad_enabled():
            # autograd's engine summing two gradients of one tensor (the recomputed forward runs with grad on).
            # It adds in place into the first when it holds the last reference, but never for a tensor
            # subclass such as a fake tensor (input_buffer.cpp): count it as on a GPU, in place.
            now -= out.untyped_storage().nbytes()
        self.peak[self.phase] = max(self.peak[self.phase], now)
        self.peak["logits"] = max(self.peak["logits"], self.now["logits"])
        return out


def step_bytes(model, shape, backward=True, grad=True):
    """One training forward (+ backward) of a fake model on a sequence of `shape` (tokens, patches of all frames into
    the merger, supervised positions with logits): the Probe that counted it. grad=False: a rollout's forward instead
    (no autograd, eval mode: nothing saved, nothing recomputed). As mmduet2.forward_logprobs under sft.py's
    accelerate, then loss = −Σ log p and loss.backward(). The frozen ViT does not run (its window attention reads the
    frame grid on the host): with no parameter to train it records nothing for backward, so we hand its output to
    the merger, which trains. Only shapes and dtypes matter here, not the values of ids and positions."""
    lm, visual = model.model.language_model, model.model.visual
    probe, dev, L = Probe(model), model.device, shape["tokens"]
    set_part = lambda part: lambda *_: setattr(probe, "part", part)  # noqa: E731
    hooks = [h for layer in lm.layers for h in (layer.register_forward_pre_hook(set_part("layers")),
                                                layer.register_forward_hook(set_part("outside")))]
    hooks.append(model.lm_head.register_forward_pre_hook(set_part("logits")))

    def forward_logprobs():  # a function, as in mmduet2: what it does not return is freed before backward
        with torch.autocast(dev.type, torch.bfloat16):
            vit = torch.empty(shape["patches"], visual.config.hidden_size, dtype=torch.bfloat16, device=dev)
            image = visual.merger(vit)  # (patches / 4, 2048) bf16: 2×2 patches → one LLM token
            ids = torch.zeros(1, L, dtype=torch.long, device=dev)
            embeds = lm.embed_tokens(ids)  # (1, L, 2048) fp32: an embedding lookup is no autocast op
            slots = torch.zeros(1, L, 1, dtype=torch.bool, device=dev)  # where the image tokens go
            embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))  # as Qwen2_5_VLModel.forward does
            keep = torch.arange(shape["supervised"], device=dev)  # positions that predict a supervised token
            out = model(inputs_embeds=embeds, position_ids=torch.zeros(3, 1, L, dtype=torch.long, device=dev),
                        logits_to_keep=keep, use_cache=False)
        logits = out.logits.float()  # (1, supervised, 151936): accelerate's convert_outputs_to_fp32 drops the bf16 one
        del out
        return mmduet2.token_logprobs(logits[0], ids[0, keep], 1.0)  # (supervised,)

    training = model.training
    model.train(grad)  # eval mode for a rollout: transformers checkpoints layers in train mode only
    with next(model.parameters()).fake_mode, probe, torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t), \
            torch.set_grad_enabled(grad):
        loss = -forward_logprobs().sum()
        if backward and grad:
            probe.part = probe.phase = "backward"
            loss.backward()
    model.train(training)
    for h in hooks:
        h.remove()
    return probe


def layer_bytes(model, tokens):
    """Bytes one decoder layer saves when run without checkpointing: what backward recomputes, one layer at a time."""
    lm = model.model.language_model
    layer, probe, dev = lm.layers[0], Probe(model), model.device
    checkpointed, layer.gradient_checkpointing = layer.gradient_checkpointing, False
    with next(model.parameters()).fake_mode, probe, torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
        with torch.autocast(dev.type, torch.bfloat16):
            h = torch.empty(1, tokens, lm.config.hidden_size, device=dev, requires_grad=True)  # the fp32 residual stream
            probe.known.add(h.untyped_storage()._cdata)  # the checkpoint's input: counted with the layers
            rope = lm.rotary_emb(h, torch.zeros(3, 1, tokens, dtype=torch.long, device=dev))  # (cos, sin) (1, L, 128) fp32
            layer(h, attention_mask=None, position_embeddings=rope)
    layer.gradient_checkpointing = checkpointed
    return sum(probe.saved.values())
