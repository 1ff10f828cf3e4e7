"""tools/bench.py: every command runs at a tiny scale and reports what it promises. No timed assertions:
the numbers depend on the machine, so we check the keys, signs and ranges, never the speed."""
import json

import pytest
import torch

import mmduet2
from tools import bench, memory_probe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Each command runs with --threads 1 (set in-process), then the suite's thread count comes back (module
    scope: the module's own fixtures run commands too, and the fixtures that later tests train depend on it).
    One thread: OpenMP threads that spin-wait for a busy second core made a 2-thread step ~30x slower."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(*argv):
    return bench.main(list(argv) + ["--threads", "1"])


def fixed(monkeypatch, command, **values):
    """Shrink what a measurement fixes (bench.FIXED: not flags) for one test."""
    for key, value in values.items():
        monkeypatch.setitem(bench.FIXED[command], key, value)


def check_report(out, name, result):
    """The JSON on disk is the returned result, the Markdown exists, and the machine is named."""
    assert json.load(open(out / f"{name}.json")) == json.loads(json.dumps(result))
    assert (out / f"{name}.md").read_text().startswith(f"## bench.py {name}")
    m = result["machine"]
    assert m["cpu"] and m["threads"] >= 1 and m["torch"] == torch.__version__ and m["device"] in ("cpu", "cuda", "meta")
    assert ("gpu_pending" in result) == (m["gpu"] is None)  # a CPU run says its numbers are not the GPU's


def test_stream_tiny(tmp_path, monkeypatch):
    fixed(monkeypatch, "stream", repeats=2, silent_turns=3, context=2, silence_steps=40)
    r = run("stream", "--turns", "12", "--out", str(tmp_path))
    check_report(tmp_path, "stream", r)
    assert r["config"]["tokens_per_frame"] == 9  # 84×84 = 3×3 merged patches
    assert [row["turn"] for row in r["turns"]] == [1, 10, 12]
    for row in r["turns"]:
        assert 0 < row["cached_p50_ms"] <= row["cached_p95_ms"] and row["encode_p50_ms"] > 0
        assert row["reencode_ms"] > 0  # every sampled turn is <= reencode_max (200) here
    ctx = [row["context_tokens"] for row in r["turns"]]
    assert (ctx[2] - ctx[1]) / 2 == (ctx[1] - ctx[0]) / 9 > 0  # every turn adds the same tokens
    assert len(r["cached_prefill_ms_per_turn"]) == 12 and min(r["cached_prefill_ms_per_turn"]) > 0
    s = r["silent"]
    assert all(s[f"{m}_p50_ms"] > 0 for m in ("fast", "slow", "bare"))
    assert 0 <= s["silent_fraction_fast"] <= 1 and s["silent_fraction_fast"] == s["silent_fraction_slow"]  # greedy: same output
    assert r["realtime_factor"]["cached_p50"] > 0 and r["realtime_factor"]["seconds_per_turn"] == 1.0
    assert set(r["targets"]) == {"cache_flat", "reencode_10x", "fast_silence"}
    assert all(isinstance(t["pass"], bool) and t["value"] > 0 for t in r["targets"].values())
    md = (tmp_path / "stream.md").read_text()
    assert md.count("PASS") + md.count("FAIL") == 3


def test_stream_without_reencoding(tmp_path, monkeypatch):
    """reencode_max 0: no full forwards, and the 10x target says N/A instead of failing."""
    fixed(monkeypatch, "stream", reencode_max=0, repeats=1, silent_turns=1, context=1, silence_steps=0)
    r = run("stream", "--turns", "3", "--out", str(tmp_path))
    assert all(row["reencode_ms"] is None for row in r["turns"])
    assert r["targets"]["reencode_10x"]["pass"] is None and "N/A" in (tmp_path / "stream.md").read_text()


def test_live_bounded_vs_unbounded(tmp_path, monkeypatch):
    """bench.py live at a tiny scale (a window of 8 frames, "minutes" of a few seconds): the keys issue 27 asks for,
    the context held within its budget by the window and growing past it without one, the rebuilds counted."""
    fixed(monkeypatch, "live", context_frames=8, reference_minutes=(0.1, 0.3), last_minutes=0.2, max_new_tokens=3,
          question_every_s=16, unbounded_minutes=1.6)
    r = run("live", "--minutes", "1.6", "--frame-size", "84", "84", "--out", str(tmp_path))
    check_report(tmp_path, "live", r)
    b, u = r["runs"]["bounded"], r["runs"]["unbounded"]
    assert r["turns"] == u["turns"] == 24  # 96 s of stream at 4 s a turn
    assert r["max_context_tokens"] == b["max_context_tokens"] <= r["context_budget_tokens"] and r["targets"]["context"]["pass"]
    # a rebuild at turns 5, 7, ..., 23 (8 frames: 4 turns; each slide keeps the last 2); 48 frames, the last 8 kept
    assert b["rebuilds"] == 10 and b["dropped_frames"] == 40 and b["memory_questions"] >= 1
    assert u["max_context_tokens"] > r["context_budget_tokens"] and u["context_budget_tokens"] is None
    assert "rebuilds" not in u and u["max_rope_position"] > b["max_rope_position"]
    assert r["latency_ratio"] > 0 and r["rss_growth_mb"] is not None
    md = (tmp_path / "live.md").read_text()
    assert md.count("PASS") + md.count("FAIL") + md.count("N/A") == 3


def test_qwen_3b_config_matches_the_release():
    """The values of Qwen/Qwen2.5-VL-3B-Instruct's config.json (+ the vision config class's defaults)."""
    _, processor = mmduet2.tiny_model()
    c = bench.qwen_3b_config(processor)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (2048, 36, 16, 2)
    assert (t.intermediate_size, t.vocab_size, t.tie_word_embeddings) == (11008, 151936, True)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (32, 1280, 3420, 16, 2048)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.window_size) == (14, 2, 2, 112)
    assert v.fullatt_block_indexes == [7, 15, 23, 31] and v.tokens_per_second == 2
    assert c.image_token_id == processor.tokenizer.convert_tokens_to_ids(mmduet2.IMAGE_PAD)  # the ids we feed
    small = bench.qwen_3b_config(processor, layers=2)
    assert small.text_config.num_hidden_layers == small.vision_config.depth == 2
    assert small.vision_config.fullatt_block_indexes == [1]


def test_stream_3b_code_path(tmp_path, monkeypatch):
    """`--model 3b --layers 1` end to end. The vocabulary is shrunk here only to keep the test fast:
    151,936 × 2,048 embeddings take ~15 s to initialise on a CPU; every other width is the 3B's."""
    monkeypatch.setitem(bench.QWEN_3B_TEXT, "vocab_size", 1024)
    fixed(monkeypatch, "stream", repeats=1, silent_turns=1, context=1, max_new_tokens=3, silence_steps=1)
    r = run("stream", "--model", "3b", "--layers", "1", "--turns", "2", "--out", str(tmp_path))
    check_report(tmp_path, "stream", r)
    assert 100 < r["machine"]["params_m"] < 200  # 1 LLM layer at width 2048 + 1 vision block + merger
    assert r["turns"][-1]["reencode_ms"] > 0 and 0 <= r["silent"]["silent_fraction_fast"] <= 1


def test_sft_tiny(tmp_path, monkeypatch):
    fixed(monkeypatch, "sft", warmup=0)
    r = run("sft", "--seq-len", "300", "--steps", "1", "--out", str(tmp_path))
    check_report(tmp_path, "sft", r)
    c = r["config"]
    assert 250 < c["seq_len"] <= 300 and c["supervised_tokens"] > 0 and c["frames"] >= 5
    assert 0 < c["trained_params_m"] < r["machine"]["params_m"]  # the vision encoder is frozen (all but its merger)
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
    assert "RSS" in r["memory_kind"] or "cuda" in r["memory_kind"]


def test_grpo_tiny(tmp_path, monkeypatch):
    fixed(monkeypatch, "grpo", segment=3.0, max_new_tokens=4, grad_checkpointing=False)
    r = run("grpo", "--steps", "1", "--out", str(tmp_path))
    check_report(tmp_path, "grpo", r)
    assert r["config"]["turns_per_step"] == 3 * 4 and r["config"]["timed_steps"] == 1
    assert r["step_s"] > 0 and r["rollout_turns_per_s"] > 0 and r["generated_tokens"] > 0
    assert set(r["share"]) == {"episodes", "rollout", "judge", "update"}
    assert sum(r["share"].values()) == pytest.approx(1.0) and all(0 <= v <= 1 for v in r["share"].values())


def test_a_bad_flag_is_one_line(capsys):
    """A bad or folded flag is one line on stderr, exit 2 (not argparse's usage block): in a sub-command's own
    flags, a flag that is not there (--repeats is bench.FIXED now), and a wrong combination."""
    for argv, message in ((["stream", "--turns", "many"], "argument --turns: invalid int value: 'many'"),
                          (["stream", "--repeats", "2"], "unrecognized arguments: --repeats 2"),
                          (["memory", "--model", "tiny"], "memory models Qwen2.5-VL-3B's architecture: --model 3b")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"bench.py: {message} (bench.py --help lists the flags)\n"


# ----------------------------------------------------------------------------
# memory: the 3B architecture at 2 layers (full widths, full vocabulary: on fake tensors they cost nothing)

GIB = 2**30


@pytest.fixture(scope="module")
def memory_2k(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    with pytest.MonkeyPatch.context() as monkeypatch:  # module scope: the function-scoped fixture is not at hand
        fixed(monkeypatch, "memory", rollout_frames=8)
        return out, run("memory", "--layers", "2", "--seq-len", "2000", "--out", str(out))


def test_memory_rows_are_parameter_arithmetic(memory_2k):
    out, r = memory_2k
    check_report(out, "memory", r)
    p, cols = r["params"], r["columns"]
    assert p["all"] == p["trained"] + p["frozen"] and 0 < p["frozen"] < p["trained"]  # the ViT frozen, LLM + merger trained
    sft, update, rollouts = cols["SFT"], cols["GRPO, update"], cols["GRPO, rollouts"]
    for col in cols.values():  # fp32 weights, fp32 gradients, two fp32 Adam moments
        assert (col["weights"], col["gradients"], col["adam"]) == (4 * p["all"], 4 * p["trained"], 8 * p["trained"])
    assert sft["ddp_copy"] == sft["optimizer_temporaries"] == sft["kv_cache"] == sft["vision_features"] == 0
    fresh, foreach = cols["SFT, fresh gradients"], cols["SFT, foreach AdamW"]
    assert fresh["ddp_copy"] == 4 * p["trained"] and fresh["peak"] - sft["peak"] == 4 * p["trained"]  # one gradient copy
    assert foreach["optimizer_temporaries"] == 4 * p["trained"]  # torch's _multi_tensor_adam: sqrt of every exp_avg_sq
    g = r["config"]["grpo"]
    assert update["kv_cache"] == 0 and update["vision_features"] == g["image_tokens"] * 2048 * 2  # the cache is freed
    assert g["image_tokens"] == 8 * 128 and rollouts["vision_features"] == update["vision_features"]
    # the rollouts' moment here is the last turn: G rows of cache at the rollout's full length, bf16 (fp32: twice)
    assert rollouts["moment"] == "last turn"
    assert rollouts["kv_cache"] == 4 * g["tokens"] * 2 * 2 * 2 * 128 * 2  # G × L × 2 layers × (K, V) × 2 heads × 128 × bf16
    assert cols["GRPO rollouts, fp32 KV cache"]["kv_cache"] == 2 * rollouts["kv_cache"]
    assert rollouts["backward_peak"] == rollouts["saved_plus_layer"] == 0  # no autograd in a rollout
    # autocast's cast cache: a bf16 copy of (almost) every trained weight, inside every forward's peak
    assert rollouts["autocast_cache"] == pytest.approx(2 * p["trained"], rel=0.03)
    assert all(col["forward_peak"] >= col["autocast_cache"] for col in cols.values())
    for col in cols.values():  # the peak: what is held + the worst of the three moments; headroom on 79.1 GiB
        transient = max(col["forward_peak"], col["backward_peak"], col["optimizer_temporaries"])
        assert col["peak"] == col["held"] + transient and col["headroom"] == round(79.1 * GIB) - col["peak"]


def test_memory_table_prints_the_json(memory_2k):
    out, r = memory_2k
    md = (out / "memory.md").read_text()
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    assert header[2:] == list(r["columns"]) and len(rows) == len(bench.MEMORY_ROWS)
    for cells, (key, _, _) in zip(rows, bench.MEMORY_ROWS):  # label, how, then one GiB number per column
        assert cells[2:] == [f"{col[key] / GIB:.2f}" for col in r["columns"].values()], key
    assert "The recipe fits" in md  # 2 layers are far from 79.1 GiB


def test_memory_activations_are_measured(memory_2k, tmp_path, monkeypatch):
    """What a formula would not give: each checkpointed layer keeps exactly its fp32 input (autocast leaves the
    residual stream fp32), the saved inputs grow linearly with the tokens, and without checkpointing every
    layer saves what the one recomputed layer saves."""
    _, a = memory_2k
    fixed(monkeypatch, "memory", rollout_frames=8)
    b = run("memory", "--layers", "2", "--seq-len", "4000", "--out", str(tmp_path))
    la, lb = a["config"]["sft"]["tokens"], b["config"]["sft"]["tokens"]
    assert 1.9 < lb / la < 2.1
    for r, n in ((a, la), (b, lb)):
        sft, bare = r["columns"]["SFT"], r["columns"]["SFT, no checkpointing"]
        assert sft["saved_layers"] == 2 * n * 2048 * 4  # (1, L, 2048) fp32 per layer
        assert bare["saved_layers"] == pytest.approx(2 * (sft["one_layer"] + n * 2048 * 4), rel=0.01)
        assert sft["one_layer"] > 10 * n * 2048 * 4  # a layer saves far more than its input: what checkpointing drops
        assert sft["saved_outside"] > 0 and sft["saved_logits"] > 0 and sft["logits_peak"] >= sft["saved_logits"]
        assert sft["forward_peak"] > sft["saved_layers"] + sft["saved_outside"]  # + autocast's weight copies
        assert sft["backward_peak"] > sft["one_layer"] and bare["backward_peak"] > sft["backward_peak"]
    ratio = lambda key: b["columns"]["SFT"][key] / a["columns"]["SFT"][key]  # noqa: E731
    assert ratio("saved_layers") == pytest.approx(lb / la)
    assert 1.5 < ratio("one_layer") < lb / la  # its activations grow with the tokens, its bf16 weight copies do not


@pytest.fixture(scope="module")
def fake_2_layers():
    _, processor = mmduet2.tiny_model()
    return processor, memory_probe.fake_3b(bench.qwen_3b_config(processor, layers=2))


def test_memory_probe_counts_what_autograd_saves(fake_2_layers):
    """memory_probe.layer_bytes against a direct count: every storage one decoder layer hands to autograd, once."""
    _, model = fake_2_layers
    lm, n = model.model.language_model, 300
    layer, params = lm.layers[0], {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        return t
    layer.gradient_checkpointing = False
    with next(model.parameters()).fake_mode, torch.autocast("cpu", torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = torch.empty(1, n, 2048, requires_grad=True)
        layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, torch.zeros(3, 1, n, dtype=torch.long)))
    layer.gradient_checkpointing = True
    direct = {k: v for k, v in saved.items() if k not in params and k != h.untyped_storage()._cdata}
    assert memory_probe.layer_bytes(model, n) == sum(b for b, _, _ in direct.values())
    kept = {(dtype, shape) for _, dtype, shape in direct.values()}
    assert (torch.bfloat16, (1, n, 11008)) in kept  # the MLP's bf16 activations (autocast)
    assert (torch.bfloat16, (1, 16, n, 128)) in kept and (torch.bfloat16, (1, 2, n, 128)) in kept  # flash: q, k
    assert not any(shape[-2:] == (n, n) for _, shape in kept)  # never an attention matrix


def test_memory_cpu_autocast_stands_for_cuda(fake_2_layers, monkeypatch):
    """The forward on a fake GPU under CUDA autocast saves and holds what the fake-CPU one does. torch.autocast
    turns itself off without a GPU; told one is there, the AutocastCUDA kernels run on the fake tensors."""
    processor, cpu = fake_2_layers
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = memory_probe.fake_3b(bench.qwen_3b_config(processor, layers=2), device="cuda")
    assert gpu.device.type == "cuda"
    shape = dict(tokens=700, patches=4 * 512, supervised=70)
    on_cpu, on_gpu = memory_probe.step_bytes(cpu, shape, backward=False), memory_probe.step_bytes(gpu, shape, backward=False)
    assert on_cpu.saved == on_gpu.saved and on_cpu.peak == on_gpu.peak
    assert on_cpu.peak["forward"] > sum(on_cpu.saved.values())  # the cast cache is there on both


def test_gpu_check_dry_run(tmp_path):
    """The prepared GPU check's orchestration, on the CPU at small sizes (the GPU tests themselves are skipped
    here; tests/test_gpu.py dry-runs them with MMDUET2_TEST_DEVICE=cpu)."""
    r = run("gpu", "--device", "cpu", "--model", "tiny", "--quick", "--out", str(tmp_path))
    st = r["stages"]
    assert set(st) == {"latency", "sft", "grpo"} and not [k for k, v in st.items() if "error" in v], st
    for fpt in ("1", "2"):
        assert st["latency"][fpt]["silent"]["silent_fraction"] == 1.0  # taught silence: fast silence accepts
        assert st["latency"][fpt]["replying"]["new_tokens"] == 8 and st["latency"][fpt]["replying"]["silent_fraction"] == 0
    assert st["sft"]["tokens_per_s"] > 0 and st["grpo"]["step_s"] > 0 and st["grpo"]["logprob_gap"] >= 0
    assert json.load(open(tmp_path / "gpu.json"))["stages"]["grpo"]["step_s"] == st["grpo"]["step_s"]
    # the spread of its one step: the random model, taught to reply at half the turns, gives rollouts that differ
    # (untaught, every group tied and no update was measured), so the update's reach is measured
    assert len(st["grpo"]["reward_std"]) == 1 and st["grpo"]["reward_std"][0] > 0 and st["grpo"]["moved_fraction"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "Per-turn latency of tiny" in md and "reward spread (std within a group) per step: " in md
    assert "No stage failed." in md and "was not silent" not in md


def test_gpu_report_flags_a_silent_row_that_replied():
    """On the first H100 run the random 3B model's "silent" two-frame turns replied (100 tokens each): the report
    says that row times replies, instead of passing it off as a silent turn's cost."""
    def turn(silent):
        return dict(p50_ms=1.0, p95_ms=1.0, new_tokens=3 if silent else 100, silent_fraction=float(silent))
    latency = {"silence_loss": 0.5, "seconds": 1.0, "1": dict(silent=turn(True), replying=turn(False)),
               "2": dict(silent=turn(False), replying=turn(False))}
    result = dict(config=dict(model="3b", layers=0, latency_context_turns=10, latency_turns=20),
                  stages=dict(latency=latency))
    md = "\n".join(bench.gpu_lines(result))
    assert "| 2 | silent | 1.0 | 1.0 | 100 | 0% |" in md
    assert "**A 'silent' row was not silent** (NO REPLY taught to a loss of 0.5)" in md


def test_gpu_check_names_a_failed_stage_and_fails(tmp_path, monkeypatch):
    """A stage that fails is named in the report, and the command's exit status says so (the others still run)."""
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")
    monkeypatch.setattr(bench, "setup", broken)  # the latency stage
    monkeypatch.setattr(bench, "bench_sft", broken)
    monkeypatch.setattr(bench, "bench_grpo", lambda a: dict(
        step_s=1.0, share={"rollout": 1.0}, rollout_turns_per_s=1.0, generated_tokens=1.0, reward_std=[0.0],
        frac_reward_zero_std=[1.0], moved_fraction=None, logprob_gap=0.0, config={}))
    with pytest.raises(SystemExit, match=r"^bench.py gpu: failed stage\(s\): latency, sft \(see "):
        run("gpu", "--device", "cpu", "--model", "tiny", "--quick", "--out", str(tmp_path))
    md = (tmp_path / "gpu.md").read_text()
    assert "**Failed stages: latency, sft**" in md and "- sft: RuntimeError: CUDA error: out of memory" in md
    assert "no group's rewards differed (spread 0): advantages 0, no update to measure" in md  # not "moved 0.00%"


def test_grpo_3b_frees_its_model_and_the_gpu_cache_before_grpo_runs(tmp_path, monkeypatch):
    """The 3B init checkpoint is written from a model on the GPU; before grpo.py starts in its own process the model
    is gone and the caching allocator has given its memory back (7.5 GB of bf16 weights would sit there unused)."""
    import subprocess
    import weakref
    built = [mmduet2.tiny_model()]  # handed over, so that bench_grpo holds the only reference
    alive, emptied, seen = weakref.ref(built[0][0]), [], {}
    monkeypatch.setattr(bench, "setup", lambda a, weights_dtype=None: (*built.pop(), {}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(alive() is None))
    monkeypatch.setattr(bench, "teach_silence", lambda *a, **k: None)  # a CPU model under a faked CUDA: not trained here

    def grpo_run(cmd, **kwargs):  # what grpo.py would meet: is the model gone, was the cache emptied after?
        seen.update(gone=alive() is None, emptied=emptied)
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")
    monkeypatch.setattr(bench.subprocess, "run", grpo_run)
    args = bench.parse_args(["grpo", "--model", "3b", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="stopped by the test"):
        bench.bench_grpo(args)
    assert seen == dict(gone=True, emptied=[True])


def test_grpo_3b_refuses_a_disk_too_small_for_what_it_writes(tmp_path, monkeypatch):
    """The 3B GRPO stage writes a bf16 init folder and grpo.py's fp32 `final` (~23 GB at 3B, no step checkpoint):
    where the disk has less free, it stops before writing anything, instead of filling it."""
    import types
    monkeypatch.setattr(bench, "setup", lambda a, weights_dtype=None: (*mmduet2.tiny_model(), {}))
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10**6))
    with pytest.raises(SystemExit, match=r"^bench.py grpo: .* GB needed in .*, 0 GB free$"):
        bench.bench_grpo(bench.parse_args(["grpo", "--model", "3b", "--out", str(tmp_path)]))
