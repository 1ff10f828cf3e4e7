"""mmduet2.py: frames, the template deltas, the loss mask, rope positions and models (the streaming engine:
tests/test_engine.py)."""
import json

import numpy as np
import pytest
import torch
from conftest import frame_index, random_frames, write_timed_video, write_video

import mmduet2
from mmduet2 import IMAGE, SILENCE

QUESTION = "Tell me whenever a new shape appears."


def dialogue(replies, frames_per_turn=2, question=QUESTION):
    messages = []
    for k, reply in enumerate(replies):
        messages.append({"role": "user", "content": IMAGE * frames_per_turn + (question if k == 0 else "")})
        messages.append({"role": "assistant", "content": reply})
    return messages


# ----------------------------------------------------------------------------
# frames

@pytest.mark.parametrize("seconds, interval, expected", [(5, 1.0, 5), (5, 2.0, 2), (7.5, 2.0, 3), (6, 2.0, 3), (3, 0.5, 6)])
def test_frame_times_and_counts(tmp_path, seconds, interval, expected):
    path = write_video(tmp_path / "v.mp4", seconds)
    frames = list(mmduet2.read_frames(path, interval))
    assert [t for t, _ in frames] == [k * interval for k in range(expected)]
    for t, frame in frames:  # frame i of the video is filled with red = 7·i: check we sampled index t·fps
        assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
        assert abs(int(frame[..., 0].mean()) - round(t * 10) * 7 % 256) <= 6


@pytest.mark.parametrize("fps, intervals", [(10, [0.05, 0.1, 0.15, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0, 2.0]),
                                             (25, [0.1, 0.3, 0.5, 1.0])])
def test_a_constant_frame_rate_video_gives_the_frames_it_always_gave(tmp_path, fps, intervals):
    # the rule before presentation times were read: frame round(k·interval·fps), duration n / fps. The toy
    # world's results rest on it, ties (0.25 s at 10 fps: frame 2.5 -> 2) and float rounding included
    import decord
    path = write_video(tmp_path / "v.mp4", 12, fps=fps, size=16)
    vr = decord.VideoReader(path, num_threads=1)
    n, rate = len(vr), vr.get_avg_fps()
    assert mmduet2.video_duration(path) == n / rate
    for interval in intervals:
        frames = list(mmduet2.read_frames(path, interval))
        before = [min(round(k * interval * rate), n - 1) for k in range(mmduet2.count_frames(n / rate, interval))]
        assert len(frames) == len(before)
        assert all(np.array_equal(frame, mmduet2._rgb(vr[i].asnumpy())) for (_, frame), i in zip(frames, before)), interval


def vfr_times():
    """A phone's variable frame rate: 30 fps for 10 s, then 2 fps (a still or dark scene) to 20 s."""
    return [i / 30 for i in range(300)] + [10 + i / 2 for i in range(20)]


def test_a_variable_frame_rate_video_is_read_by_its_presentation_times(tmp_path):
    times = vfr_times()
    path = write_timed_video(tmp_path / "vfr.mp4", times)
    # by index / average fps (17.2): 18.6 s, the frame labelled 17 s showed 9.6 s, the last 10 s never came
    assert mmduet2.video_duration(path) == 20.0  # the last frame lasts as long as the gap before it
    frames = list(mmduet2.read_frames(path, 1.0))
    assert [t for t, _ in frames] == list(range(20))
    shown = [frame_index(frame) for _, frame in frames]
    assert shown == [min(range(len(times)), key=lambda i: abs(times[i] - t)) for t, _ in frames]
    assert times[shown[17]] == 17.0 and times[shown[9]] == 9.0


def test_a_portrait_phone_video_comes_upright(tmp_path):
    # stored 128 wide × 96 high with "rotate 90" (counter-clockwise) in its display matrix: shown 96 × 128
    path = write_timed_video(tmp_path / "portrait.mp4", [i / 10 for i in range(30)], rotation=90)
    (_, frame), *_ = mmduet2.read_frames(path, 1.0)
    assert frame.shape == (128, 96, 3)
    assert frame[:64, :48].min() < 100 and frame[64:, :48].min() > 200  # the stored top-left is now bottom-left


def test_turn_times():
    assert mmduet2.turn_times(5, 2.0, 2) == [4.0, 8.0, 10.0]
    assert mmduet2.turn_times(4, 1.0, 2) == [2.0, 4.0]  # paper Fig. 2: first 2-frame turn at 1 s/frame → t=2
    assert mmduet2.turn_times(3, 1.0, 1) == [1.0, 2.0, 3.0]
    assert mmduet2.turn_times(3, 0.5, 1) == [0.5, 1.0, 1.5]


def test_frame_tokens():
    assert mmduet2.frame_tokens(84, 84) == 9
    assert mmduet2.frame_tokens(448, 224) == 128     # the paper's exact 128-token frame
    assert mmduet2.frame_tokens(1080, 1920) == 120   # 16:9 under the 128·28·28 pixel cap


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="video not found"):
        next(mmduet2.read_frames(str(tmp_path / "missing.mp4"), 1.0))
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="cannot decode"):
        next(mmduet2.read_frames(str(tmp_path / "junk.mp4"), 1.0))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError):
        next(mmduet2.read_frames(str(tmp_path / "empty.mp4"), 1.0))
    path = write_video(tmp_path / "short.mp4", 0.5)
    with pytest.raises(ValueError, match="shorter than one frame interval"):
        next(mmduet2.read_frames(path, 1.0))
    with pytest.raises(ValueError, match="interval must be > 0"):
        next(mmduet2.read_frames(path, 0))
    with pytest.raises(ValueError, match="frames per turn"):
        mmduet2.turn_times(4, 1.0, 3)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        mmduet2.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        mmduet2.load_model("runs/sft/final-that-does-not-exist")
    (tmp_path / "utf16.jsonl").write_text('{"messages": []}\n', encoding="utf-16")  # as some Windows editors save
    with pytest.raises(ValueError, match=f"^{tmp_path}/utf16.jsonl:1: not UTF-8 text \\(saved as UTF-16\\?\\)"):
        list(mmduet2.read_jsonl(str(tmp_path / "utf16.jsonl")))


# ----------------------------------------------------------------------------
# token ids in, token ids out

def test_deltas_equal_whole_conversation(tiny):
    """Message-by-message deltas == the processor on the whole conversation rendered by its template."""
    _, processor = tiny
    frames = random_frames(6)
    messages = dialogue(["NO REPLY", "A red square appeared on the left.", SILENCE])
    seq = mmduet2.encode_dialogue(processor, messages, frames)
    full = [{"role": "system", "content": mmduet2.SYSTEM_PROMPT}] + messages
    text = processor.apply_chat_template([mmduet2.to_chat(m) for m in full], tokenize=False)
    ref = processor(text=[text], images=frames, return_tensors="pt")
    assert seq.ids == ref["input_ids"][0].tolist()
    assert seq.mm_types == ref["mm_token_type_ids"][0].tolist()
    assert seq.grids == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    assert torch.equal(torch.cat(seq.pixels), ref["pixel_values"])


def test_system_turn_in_data_overrides_default(tiny):
    _, processor = tiny
    messages = [{"role": "system", "content": mmduet2.DEFAULT_SYSTEM_PROMPT}] + dialogue(["Blue."], 1)
    seq = mmduet2.encode_dialogue(processor, messages, random_frames(1))
    text = processor.tokenizer.decode(seq.ids)
    assert mmduet2.DEFAULT_SYSTEM_PROMPT in text and "NO REPLY\"" not in text


def test_a_saved_checkpoint_renders_an_offline_prompt_as_qwen25vl_does(tiny, tmp_path):
    """What lmms-eval (Table 4) feeds a checkpoint of ours: Qwen's default system prompt, a video and a question,
    rendered by the template saved with the checkpoint (runs.save_checkpoint: save_pretrained of model and
    processor). The reference is Qwen2.5-VL's own template rendered by hand: with the system turn given or
    left out (the template adds the default), a video as <|video_pad|>, an image as <|image_pad|>."""
    from transformers import AutoProcessor
    model, processor = tiny
    model.save_pretrained(tmp_path), processor.save_pretrained(tmp_path)
    saved = AutoProcessor.from_pretrained(tmp_path)
    question = [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What colour is the square?"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What colour is the square?<|im_end|>\n"
                "<|im_start|>assistant\n")
    for system in ([{"role": "system", "content": mmduet2.DEFAULT_SYSTEM_PROMPT}], []):
        messages = system + [{"role": "user", "content": question}]
        assert saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": "Red."}]
    assert saved.apply_chat_template(image, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")


def test_mask_is_exactly_assistant_text_and_im_end(tiny):
    _, processor = tiny
    replies = ["NO REPLY", "A red square appeared on the left.", "NO REPLY", "Blue."]
    seq = mmduet2.encode_dialogue(processor, dialogue(replies), random_frames(8))
    runs, run = [], []
    for i, m in zip(seq.ids, seq.mask + [0]):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    decoded = [processor.tokenizer.decode(r) for r in runs]
    assert decoded == [r + mmduet2.IM_END for r in replies]
    # the header before each trained run is the template's, untrained
    header = processor.tokenizer.encode("<|im_start|>assistant\n")
    starts = [i for i in range(1, len(seq.mask)) if seq.mask[i] and not seq.mask[i - 1]]
    assert all(seq.ids[s - len(header):s] == header for s in starts)


def test_history_turns_are_not_trained(tiny):
    """An assistant turn marked "train": false (data.py --history-frac) is context: mask 0, ids unchanged."""
    _, processor = tiny
    messages = dialogue(["A red square appeared on the left.", "NO REPLY"])
    plain = mmduet2.encode_dialogue(processor, messages, random_frames(4))
    messages[1] = dict(messages[1], train=False)
    history = mmduet2.encode_dialogue(processor, messages, random_frames(4))
    assert history.ids == plain.ids
    trained = [i for i, m in zip(history.ids, history.mask) if m]
    assert processor.tokenizer.decode(trained) == "NO REPLY" + mmduet2.IM_END  # only the later turn is supervised
    assert sum(plain.mask) > sum(history.mask)


def test_chunk_positions_equal_whole_positions(tiny):
    """Rope positions chunk by chunk (offset by where the sequence is) == positions of the whole."""
    model, processor = tiny
    frames = random_frames(6)
    sys_chunk = mmduet2.encode_system(processor)
    chunks = [sys_chunk]
    for k, reply in enumerate(["NO REPLY", "A red square.", "NO REPLY"]):
        chunks.append(mmduet2.encode_user(processor, QUESTION if k == 0 else None, frames[2 * k:2 * k + 2],
                                          generation_prompt=False))
        chunks.append(mmduet2.encode_assistant(processor, reply))
    whole = sum(chunks[1:], chunks[0])
    ref = mmduet2.rope_positions(model, whole)
    pieces, start = [], 0
    for c in chunks:
        p = mmduet2.rope_positions(model, c, start)
        pieces.append(p)
        start = int(p.max()) + 1
    assert torch.equal(torch.cat(pieces, -1), ref)
    assert not torch.equal(ref[0], ref[1])  # really 3-D: image tokens have distinct h/w positions


def test_truncate_drops_partial_image(tiny):
    _, processor = tiny
    seq = mmduet2.encode_dialogue(processor, dialogue(["NO REPLY", "Blue."]), random_frames(4))
    first_img = seq.mm_types.index(1)
    cut = mmduet2.truncate(seq, first_img + 3)  # 3 tokens into the first image
    assert len(cut.ids) == first_img and cut.pixels == [] and cut.grids == []
    short = mmduet2.encode_dialogue(processor, dialogue(["NO REPLY", "Blue."]), random_frames(4), max_tokens=80)
    assert len(short.ids) <= 80 and sum(short.mm_types) == 9 * len(short.grids)


def test_tiny_model_saves_and_reloads(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, processor2 = mmduet2.load_model(str(tmp_path))
    seq = mmduet2.encode_dialogue(processor, dialogue(["NO REPLY"]), random_frames(2))
    assert mmduet2.encode_dialogue(processor2, dialogue(["NO REPLY"]), random_frames(2)).ids == seq.ids
    with torch.no_grad():
        a = model(**mmduet2.model_inputs(model, seq)).logits
        b = model2(**mmduet2.model_inputs(model2, seq)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("remove, named", [
    ("config.json", "config.json"),  # transformers built a full-size default Qwen2.5-VL: 21 GB
    ("model.safetensors", "weights (model.safetensors)"),
    ("chat_template.jinja", "chat template (chat_template.jinja)"),  # a transformers traceback
    ("tokenizer.json", "tokenizer.json"),  # "Image features and image tokens do not match": the wrong cause
    ("processor_config.json", "image processor settings (preprocessor_config.json or processor_config.json)"),
    ("shard", "model-00002-of-00002.safetensors"),  # a sharded checkpoint with a shard missing
])
def test_a_model_folder_missing_a_file_is_one_line_before_anything_is_built(tiny, tmp_path, monkeypatch, remove, named):
    for part in tiny:
        part.save_pretrained(tmp_path)
    if remove == "shard":  # the index names two shards; only the first is there
        (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    else:
        (tmp_path / remove).unlink()
    monkeypatch.setattr(mmduet2, "_from_pretrained", lambda *a, **k: pytest.fail("built a model from a broken folder"))
    with pytest.raises(FileNotFoundError) as e:
        mmduet2.load_model(str(tmp_path))
    assert str(e.value).startswith(f"model folder {tmp_path} has no {named}: not a whole checkpoint")


@pytest.mark.parametrize("version, ok", [("5.17.0", False), ("5.23.0.dev0", False), ("5.23.0", True), ("6.0.1", True)])
def test_transformers_older_than_needed_is_one_line_at_import(tmp_path, version, ok):
    """transformers 5.17 (the GPU image's) takes `mm_encoder_outputs` into **kwargs and ignores it: cached turns
    would run without their frames, silently. So `import mmduet2` checks the installed version first. The version
    is faked with a dist-info folder ahead of the real one on the path (importlib.metadata finds it first)."""
    import os
    import subprocess
    import sys
    info = tmp_path / f"transformers-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: transformers\nVersion: {version}\n")
    root = os.path.dirname(os.path.abspath(mmduet2.__file__))
    p = subprocess.run([sys.executable, "-c", "import mmduet2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{root}"})
    if ok:
        assert p.returncode == 0, p.stderr
    else:
        assert p.returncode == 1 and p.stderr == (f"mmduet2.py: transformers {version} is installed; this code needs "
                                                  "transformers >= 5.23 (pip install -r requirements.txt)\n"), p.stderr


def test_bf16_loading_keeps_fp32_buffers_exact(tiny, tmp_path):
    """dtype=bf16 casts the weights, never the buffers: rope's inverse frequencies stay the fp32 values they were
    made as (rounded to bf16, 0.4217 becomes 0.4219: at position 10,000 a rotation is off by radians). Both ways
    a model loads: the tiny one built here, and a folder through from_pretrained."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    want = dict(model.named_buffers())
    assert want and all(b.dtype == torch.float32 for b in want.values())
    for name in ("tiny", str(tmp_path)):
        bf16 = mmduet2.load_model(name, dtype=torch.bfloat16, device="cpu")[0]
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
        for key, buffer in bf16.named_buffers():
            assert buffer.dtype == torch.float32 and torch.equal(buffer, want[key]), (name, key)
