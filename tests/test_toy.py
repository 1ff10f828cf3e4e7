"""Tests for toy.py, the toy world: deterministic to the byte, the videos show what the annotations say, the
answers sit where a model can learn them, and the scene lists go through data.py's construction.

    .venv/bin/python -m pytest tests/test_toy.py -q
"""
import json
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import mmduet2  # noqa: E402
import toy  # noqa: E402
from mmduet2 import IMAGE, SILENCE  # noqa: E402

SMALL = dict(n_train=2, n_rl=1, n_test=1, min_len=20, max_len=24)


def decode(path):
    """All frames of an mp4 as (T, H, W, 3) uint8 RGB, with PyAV (independent of the hub's reader)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def files(root):
    """Every file under root but the lock files (runs.hold_output: the writer's pid, not data)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    data.make_toy(root / "a", seed=5, **SMALL)
    return root


def test_toy_is_deterministic_by_seed(toy_dir):
    data.make_toy(toy_dir / "b", seed=5, **SMALL)
    data.make_toy(toy_dir / "c", seed=6, **SMALL)
    a, b, c = files(toy_dir / "a"), files(toy_dir / "b"), files(toy_dir / "c")
    # per split: scenes/sft/anno/offline jsonl, anno.json, build.json; test/questions_proactive.json; 4 videos
    assert len(a) == 3 * 6 + 1 + 4
    assert a == b  # same seed: same annotations, dialogues and video bytes
    assert a["train/anno.json"] != c["train/anno.json"] and a["train/videos/train_0000.mp4"] != c["train/videos/train_0000.mp4"]


def test_toy_written_twice_at_once_is_byte_identical(tmp_path):
    """Two `data.py toy` processes at once (a loaded machine), same seed: every file the same bytes. Before
    yuv_frame, 2-7 of 150 videos differed in such runs (x264 read uninitialised row padding); before
    x264_options, now and then one (x264's AVX-512 code)."""
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "toy", "--seed", "3", "--n-train", "12", "--n-rl", "4",
           "--n-test", "4"]
    runs = [subprocess.Popen(cmd + ["--out", str(tmp_path / name)], stdout=subprocess.DEVNULL) for name in "ab"]
    assert [r.wait(timeout=600) for r in runs] == [0, 0]
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(a) == 3 * 6 + 1 + 20  # per split: scenes/sft/anno/offline jsonl, anno.json, build.json; + 1; 20 videos
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []  # the names of the files that differ


def test_x264_options_are_all_taken(tmp_path, caplog, monkeypatch):
    """libx264 only warns about an option it cannot parse and encodes on: a misspelt instruction set would
    silently bring back the AVX-512 code (x264_options). The options of an AVX-512 CPU, whatever this one has."""
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    options = toy.x264_options(str(tmp_path / "cpuinfo"))
    assert "asm=AVX2" in options["x264-params"]
    monkeypatch.setattr(toy, "x264_options", lambda: options)
    level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)  # PyAV hands FFmpeg's log to Python's logging from this level
    try:
        with caplog.at_level("WARNING"):
            toy.render_video(tmp_path / "v.mp4", 1.0, [], seed=0, **toy.WORLD)
    finally:
        av.logging.set_level(level)
    assert decode(tmp_path / "v.mp4").shape == (10, 84, 84, 3)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("libav")] == []


def test_yuv_frame_sets_every_byte_the_encoder_reads():
    rgb = np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    frame = toy.yuv_frame(rgb)
    # the pixels are the converter's, the padding after each row zero
    assert np.array_equal(frame.to_ndarray(), av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray())
    for plane, width in zip(frame.planes, (84, 42, 42)):
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        assert plane.line_size > width and not rows[:, width:].any()


def test_toy_videos_show_exactly_what_the_annotations_say(toy_dir):
    split = toy_dir / "a" / "train"
    boxes, side = toy.boxes(toy.WORLD["size"])
    fps = toy.WORLD["fps"]
    palette = {**toy.COLOURS, "background": (toy.BACKGROUND,) * 3}
    anno = {a["question_id"]: a for a in json.loads((split / "anno.json").read_text())}
    for line in (split / "scenes.jsonl").read_text().splitlines():
        rec = json.loads(line)
        frames = decode(split / rec["video"])
        assert len(frames) == round(rec["duration"] * fps)
        assert 2 <= len(rec["scenes"]) <= 4 and rec["scenes"][0]["start"] >= 1.0
        for s in rec["scenes"]:
            assert s["caption"] == toy.caption(s["colour"])
            assert 5.0 <= s["end"] - s["start"] <= 10.0 and s["end"] <= rec["duration"] - 1.0
            y, x = boxes[s["position"]]
            centre = frames[:, y + side // 2, x + side // 2].astype(int)  # (T, 3)
            for k, pixel in enumerate(centre):
                nearest = min(palette, key=lambda name: np.abs(pixel - palette[name]).sum())
                visible = any(o["position"] == s["position"] and o["start"] <= k / fps < o["end"] for o in rec["scenes"])
                if s["start"] <= k / fps < s["end"]:
                    assert nearest == s["colour"] and np.abs(pixel - palette[s["colour"]]).max() < 25, (rec["id"], k)
                elif not visible:
                    assert nearest == "background", (rec["id"], k)
        for a, b in zip(rec["scenes"], rec["scenes"][1:]):
            assert b["start"] - a["end"] >= 2.0 - 1e-9  # gaps of at least 2 s
        # the gold spans are the drawn events (1QnA, or nQnA answers in the spans)
        related = {tuple(g["related_timespan"]) for g in anno[rec["id"]]["answer"]}
        assert related - {(0.0, q["time"]) for q in anno[rec["id"]]["conversation"]} <= {(s["start"], s["end"]) for s in rec["scenes"]}


def test_toy_frames_through_the_hub_reader_match_the_dialogue(toy_dir):
    # the trainer samples frames with mmduet2.read_frames: as many as the dialogue has <image>s,
    # and each sampled frame shows the event the scene list says is on screen at its time
    split = toy_dir / "a" / "rl"
    boxes, side = toy.boxes(toy.WORLD["size"])
    rec = json.loads((split / "scenes.jsonl").read_text().splitlines()[0])
    dialogue = json.loads((split / "sft.jsonl").read_text().splitlines()[0])
    frames = list(mmduet2.read_frames(str(split / dialogue["video"]), dialogue["interval"]))
    assert len(frames) == sum(m["content"].count(IMAGE) for m in dialogue["messages"])
    for t, frame in frames:
        for s in rec["scenes"]:
            y, x = boxes[s["position"]]
            on = np.abs(frame[y + side // 2, x + side // 2].astype(int) - toy.COLOURS[s["colour"]]).max() < 25
            assert on == (s["start"] <= t < s["end"]), (t, s)


def test_toy_answers_follow_a_frame_that_shows_the_event_and_never_sit_at_the_last_turn(toy_dir):
    # toy.md's exploration trap: a reply turn (end-of-span or history) must show the square in its last frame, not
    # one that has not appeared yet; and the quiet end (toy.QUIET_END) keeps every answer off the last turn
    said = 0
    for split in ("train", "rl", "test"):
        root = toy_dir / "a" / split
        scenes = {json.loads(l)["id"]: json.loads(l)["scenes"] for l in (root / "scenes.jsonl").read_text().splitlines()}
        for line in (root / "sft.jsonl").read_text().splitlines():
            d = json.loads(line)
            last_turn = d["messages"][-1]["time"]
            for m in d["messages"]:
                for s in scenes[d["id"]]:
                    # either question's answer: the caption, or the colour alone ("Red.")
                    said_here = {p.strip() for p in re.findall(r"[^.]+\.", m["content"])}  # its sentences
                    if m["role"] == "assistant" and {s["caption"], s["colour"].capitalize() + "."} & said_here:
                        last_frame = m["time"] - d["interval"]
                        assert s["start"] <= last_frame < s["end"] and m["time"] < last_turn, (d["id"], m)
                        said += 1
            assert d["messages"][-1]["content"] == SILENCE
    assert said >= 8  # 4 videos of 2-4 events (count guard: the loop above asserted something)


def test_toy_writer_goes_through_the_same_construction(toy_dir):
    writer = toy.Writer()
    captions = [toy.caption("red"), toy.caption("blue")]
    qas = writer.questions(captions, 2)
    assert [qa["question"] for qa in qas] == list(toy.QUESTIONS)
    assert qas[0]["answers"] == captions and qas[1]["answers"] == ["Red.", "Blue."]
    assert writer.summarise("?", ["Red.", "Blue."]) == "So far: Red. Blue."
    anno = json.loads((toy_dir / "a" / "train" / "anno.json").read_text())
    assert all(a["conversation"][0]["content"] in toy.QUESTIONS for a in anno)


def test_toy_offline_questions_name_the_colours_in_order(toy_dir):
    split = toy_dir / "a" / "test"
    scenes = [json.loads(line) for line in (split / "scenes.jsonl").read_text().splitlines()]
    offline = [json.loads(line) for line in (split / "offline.jsonl").read_text().splitlines()]
    assert len(offline) == len(scenes) >= 1
    for rec, video in zip(offline, scenes):
        messages, frames = mmduet2.load_dialogue(rec, split)
        colours = [s["colour"] for s in video["scenes"]]
        # Qwen's default system prompt: an offline task, not the proactive one (Sec. 4.1)
        assert messages[0]["content"] == mmduet2.DEFAULT_SYSTEM_PROMPT and len(frames) == data.OFFLINE_FRAMES
        assert messages[-1]["content"].lower().rstrip(".").split(", ") == colours


def test_toy_streamingbench_asks_for_each_square_in_its_own_clip(toy_dir):
    """test/questions_proactive.json: StreamingBench's layout, one question per square; its clip starts after the
    square before it has gone, its ground-truth time is the first whole second the square shows (docs/benchmarks.md)."""
    import math

    import benchmarks
    split = toy_dir / "a" / "test"
    scenes = [json.loads(line) for line in (split / "scenes.jsonl").read_text().splitlines()]
    questions = benchmarks.load_streamingbench(split / "questions_proactive.json")
    assert len(questions) == sum(len(v["scenes"]) for v in scenes) >= 2
    frames = decode(split / "videos" / "test_0000.mp4")  # 10 fps
    corners, side = toy.boxes(84)
    q = iter(questions)
    for video in scenes:
        end_before = 0.0
        for k, event in enumerate(video["scenes"]):
            question = next(q)
            assert question["question_id"] == f"{video['id']}_q{k}" and question["video"] == f"./{video['video']}"
            output = event["colour"].capitalize()
            assert question["question"] == f'When a {event["colour"]} square appears, output "{output}".'
            assert question["gt_output"] == output and question["gt_time"] == math.ceil(event["start"])
            assert question["start"] == math.ceil(end_before) < question["gt_time"]  # the square before has gone
            assert question["gt_time"] + benchmarks.SB_TAIL <= video["duration"]  # the polling fits in the video
            end_before = event["end"]
            if video["id"] == "test_0000":  # the square is on screen at the ground-truth time (decoded, not assumed)
                y, x = corners[event["position"]]
                pixel = frames[round(question["gt_time"] * 10), y + side // 2, x + side // 2].astype(int)
                assert np.abs(pixel - toy.COLOURS[event["colour"]]).max() < 20
