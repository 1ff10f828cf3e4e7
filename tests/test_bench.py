"""bench.py: every command runs at a tiny scale and reports what it promises. No timed assertions:
the numbers depend on the machine, so we check the keys, signs and ranges, never the speed."""
import json

import pytest
import torch

import bench
import mmduet2


@pytest.fixture(autouse=True)
def one_thread():
    """Each command runs with --threads 1 (set in-process), then the suite's thread count comes back.
    One thread: OpenMP threads that spin-wait for a busy second core made a 2-thread step ~30x slower."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(*argv):
    return bench.main(list(argv) + ["--threads", "1"])


def check_report(out, name, result):
    """The JSON on disk is the returned result, the Markdown exists, and the machine is named."""
    assert json.load(open(out / f"{name}.json")) == json.loads(json.dumps(result))
    assert (out / f"{name}.md").read_text().startswith(f"## bench.py {name}")
    m = result["machine"]
    assert m["cpu"] and m["threads"] >= 1 and m["torch"] == torch.__version__ and m["device"] in ("cpu", "cuda")
    assert ("gpu_pending" in result) == (m["gpu"] is None)  # a CPU run says the GPU numbers are still to come


def test_stream_tiny(tmp_path):
    r = run("stream", "--turns", "12", "--reencode-max", "12", "--repeats", "2", "--silent-turns", "3",
                    "--context", "2", "--silence-steps", "40", "--out", str(tmp_path))
    check_report(tmp_path, "stream", r)
    assert r["config"]["tokens_per_frame"] == 9  # 84×84 = 3×3 merged patches
    assert [row["turn"] for row in r["turns"]] == [1, 10, 12]
    for row in r["turns"]:
        assert 0 < row["cached_p50_ms"] <= row["cached_p95_ms"] and row["encode_p50_ms"] > 0
        assert row["reencode_ms"] > 0  # every sampled turn is <= --reencode-max here
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


def test_stream_without_reencoding(tmp_path):
    """--reencode-max 0: no full forwards, and the 10x target says N/A instead of failing."""
    r = run("stream", "--turns", "3", "--reencode-max", "0", "--repeats", "1", "--silent-turns", "1",
                    "--context", "1", "--silence-steps", "0", "--out", str(tmp_path))
    assert all(row["reencode_ms"] is None for row in r["turns"])
    assert r["targets"]["reencode_10x"]["pass"] is None and "N/A" in (tmp_path / "stream.md").read_text()


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
    r = run("stream", "--model", "3b", "--layers", "1", "--turns", "2", "--reencode-max", "2", "--repeats", "1",
                    "--silent-turns", "1", "--context", "1", "--silence-steps", "1", "--max-new-tokens", "3",
                    "--out", str(tmp_path))
    check_report(tmp_path, "stream", r)
    assert 100 < r["machine"]["params_m"] < 200  # 1 LLM layer at width 2048 + 1 vision block + merger
    assert r["turns"][-1]["reencode_ms"] > 0 and 0 <= r["silent"]["silent_fraction_fast"] <= 1


def test_sft_tiny(tmp_path):
    r = run("sft", "--seq-len", "300", "--steps", "1", "--warmup", "0", "--out", str(tmp_path))
    check_report(tmp_path, "sft", r)
    c = r["config"]
    assert 250 < c["seq_len"] <= 300 and c["supervised_tokens"] > 0 and c["frames"] >= 5
    assert 0 < c["trained_params_m"] < r["machine"]["params_m"]  # the vision encoder is frozen (all but its merger)
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
    assert "RSS" in r["memory_kind"] or "cuda" in r["memory_kind"]


def test_grpo_tiny(tmp_path):
    r = run("grpo", "--steps", "1", "--group", "4", "--segment", "3", "--max-new-tokens", "4",
                    "--no-grad-checkpointing", "--out", str(tmp_path))
    check_report(tmp_path, "grpo", r)
    assert r["config"]["turns_per_step"] == 3 * 4 and r["config"]["timed_steps"] == 1
    assert r["step_s"] > 0 and r["rollout_turns_per_s"] > 0 and r["generated_tokens"] > 0
    assert set(r["share"]) == {"rollout", "judge", "update"}
    assert sum(r["share"].values()) == pytest.approx(1.0) and all(0 <= v <= 1 for v in r["share"].values())


def test_grpo_refuses_3b():
    with pytest.raises(SystemExit):
        bench.parse_args(["grpo", "--model", "3b"])

