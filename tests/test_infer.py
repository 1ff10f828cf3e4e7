"""infer.py: turn grouping, user-text placement, the single-video CLI, live sources, the benchmark protocol, bad input.

Hermetic: synthetic mp4s written here with PyAV (served as network streams by a local HTTP server on
127.0.0.1), the random tiny Qwen2.5-VL built in-process. A random
model rarely says NO REPLY, so model runs check the structure of the output, not its content; the
silence and placement rules are checked exactly with a scripted stand-in for `engine.Stream`.
"""
import contextlib
import errno
import http.server
import io
import itertools
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import engine  # noqa: E402
import evaluate  # noqa: E402
import infer  # noqa: E402
import live  # noqa: E402
import mmduet2  # noqa: E402
from conftest import another_run_writing, frame_index, write_timed_video, write_video  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    paths = {"a": write_video(d / "a.mp4", 6), "b": write_video(d / "b.mp4", 5), "seven": write_video(d / "seven.mp4", 7),
             "short": write_video(d / "short.mp4", 0.5), "junk": str(d / "junk.mp4")}
    (d / "junk.mp4").write_bytes(b"not a video at all" * 200)
    return d, paths


@pytest.fixture
def fast_load(monkeypatch, tiny):
    """main() loads the tiny model from this module's copy instead of building it again (5 s each)."""
    def load(name, dtype=None, device=None, attn=None, frame_tokens=128):
        assert name == "tiny"
        return tiny
    monkeypatch.setattr(mmduet2, "load_model", load)


class ScriptedStream:
    """Stands in for engine.Stream: records each turn and answers from a script (cycled)."""
    rebuilds = 0  # and for the engine.Window around it (NoWindow): it never rebuilds

    def __init__(self, script):
        self.script, self.turns = script, []

    def turn(self, frames, text=None, **decode):
        self.turns.append((len(frames), text))
        answer = self.script[(len(self.turns) - 1) % len(self.script)]
        return engine.Reply(answer, [], [])


class NoWindow:
    """Stands in for engine.Window around a ScriptedStream (which has no cache to bound): the stream itself."""

    def __new__(cls, stream, frames):
        return stream


def records(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture
def scripted(monkeypatch):
    """main() streams through ScriptedStreams answering "Seen." every turn (no model work); returns them."""
    streams = []

    def make(model, processor):
        streams.append(ScriptedStream(["Seen."]))
        return streams[-1]
    monkeypatch.setattr(engine, "Stream", make)
    monkeypatch.setattr(engine, "Window", NoWindow)
    return streams


def ctrl_c_at(monkeypatch, n):
    """Ctrl-C arrives during the n-th turn, counted over all ScriptedStreams."""
    count, turn = [0], ScriptedStream.turn

    def interrupted(self, frames, text=None, **decode):
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt
        return turn(self, frames, text, **decode)
    monkeypatch.setattr(ScriptedStream, "turn", interrupted)


@pytest.fixture
def damaged(monkeypatch):
    """The videos whose paths are put in this set fail to decode at t = 2 s, their first frames fine: a damaged
    file that fails at a known place (on a real one decord fails a few frames earlier or later, run to run)."""
    paths, real = set(), mmduet2.read_frames

    def read_frames(path, interval, start=0.0):
        for t, frame in real(path, interval, start):
            if path in paths and t >= 2:
                raise ValueError(f"cannot decode video {path} (reading its frame at {t:g} s): Error sending packet")
            yield t, frame
    monkeypatch.setattr(mmduet2, "read_frames", read_frames)
    return paths


def check_record(rec, qid, turn_times):
    """The benchmark's prediction format: roles, times on the turn grid, monotone, no silence, user texts only."""
    assert set(rec) == {"question_id", "model_response_list"} and rec["question_id"] == qid
    times = [r["time"] for r in rec["model_response_list"]]
    assert times == sorted(times)
    for r in rec["model_response_list"]:
        assert set(r) == {"role", "content", "time"} and r["role"] in ("user", "assistant")
        assert any(abs(r["time"] - t) < 1e-6 for t in turn_times)
        assert isinstance(r["content"], str) and not mmduet2.is_silent(r["content"])
        assert r["role"] == "assistant" or r["content"]  # image-only user turns are left out


# ----------------------------------------------------------------------------
# pure parts

def test_clock():
    assert infer.clock(7.0) == "00:07" and infer.clock(62.5) == "01:02.5" and infer.clock(600) == "10:00"


def test_video_turns_groups_frames_lazily(videos):
    _, v = videos
    turns = [(t, len(f)) for t, f in infer.video_turns(v["seven"], 1.0, 2)]
    assert turns == [(2.0, 2), (4.0, 2), (6.0, 2), (7.0, 1)]  # the last turn holds the odd frame
    assert [(t, len(f)) for t, f in infer.video_turns(v["seven"], 1.0, 2, rounds=3)] == [(2.0, 2), (3.0, 1)]
    assert [t for t, _ in infer.video_turns(v["seven"], 2.0, 1)] == [2.0, 4.0, 6.0]


def test_stream_video_places_text_and_drops_silence(videos):
    _, v = videos
    stream = ScriptedStream(["NO REPLY", " A grey square. ", "NO REPLY"])
    seen = []
    user = [(2.5, "Subtitle: one"), (0, "What changes?"), (2.7, "Subtitle: two"), (99, "never seen")]
    responses, latencies = infer.stream_video(stream, v["seven"], 1.0, 2, user, on_reply=lambda t, x: seen.append((t, x)))
    # turns at 2, 4, 6, 7; the question joins t=2 (after its frames), both subtitles join t=4
    assert stream.turns == [(2, "What changes?"), (2, "Subtitle: one\nSubtitle: two"), (2, None), (1, None)]
    assert responses == [{"role": "user", "content": "What changes?", "time": 2.0},
                         {"role": "user", "content": "Subtitle: one\nSubtitle: two", "time": 4.0},
                         {"role": "assistant", "content": "A grey square.", "time": 4.0}]
    assert seen == [(4.0, "A grey square.")] and len(latencies) == 4
    kept, _ = infer.stream_video(ScriptedStream(["NO REPLY"]), v["seven"], 1.0, 2, keep_silent=True, rounds=2)
    assert kept == [{"role": "assistant", "content": "NO REPLY", "time": 2.0}]


def test_realtime_waits_for_the_frames(videos):
    _, v = videos
    start = time.perf_counter()
    feed = live.Feed(itertools.islice(mmduet2.read_frames(v["a"], 1.0), 2), 1.0, 1)  # --realtime: played as live
    infer.stream_video(ScriptedStream(["NO REPLY"]), feed)
    assert time.perf_counter() - start >= 1.95  # the turn at t=2 s cannot start before 2 s of wall time
    assert (feed.taken, feed.dropped, len(feed.lags)) == (2, 0, 2)


def test_parse_asks():
    assert infer.parse_asks(["12:What now?", "0.5: Who: him?"], end=20) == [(12.0, "What now?"), (0.5, "Who: him?")]


# ----------------------------------------------------------------------------
# frames as infer.py reads them (mmduet2's frames section)

def ramp(width, height, k):
    """Frame k of a test pattern: red ramps left to right, green top to bottom, blue with k."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, width)[None]
    img[:, :, 1] = np.linspace(0, 255, height)[:, None]
    img[:, :, 2] = 20 * k
    return img


def ramp_video(path, width, height, n=10, fps=10):
    """A lossless (qp 0, 4:4:4) mp4 of `ramp` frames: what decodes must be the pattern, pixel for pixel (±4)."""
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, "yuv444p", {"qp": "0"}
        for k in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(ramp(width, height, k), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def damaged_video(path, seconds=10, keep=0.4):
    """An mp4 whose index (moov) is intact but whose frame data (mdat) is zeroed after its first `keep`:
    it opens and its first frames decode, then decoding fails part-way."""
    write_video(path, seconds)
    raw = bytearray(open(path, "rb").read())
    i = 0
    while i < len(raw):  # top-level boxes: a 4-byte big-endian size, then a 4-byte type
        size, kind = int.from_bytes(raw[i:i + 4], "big"), bytes(raw[i + 4:i + 8])
        if kind == b"mdat":
            cut = i + 8 + int((size - 8) * keep)
            raw[cut:i + size] = bytes(i + size - cut)
        i += size
    open(path, "wb").write(raw)
    return str(path)


def test_one_frame_count_rule(videos, monkeypatch):
    _, v = videos
    assert mmduet2.count_frames(10.5, 2) == 5 and mmduet2.count_frames(0.3, 0.1) == 3  # 0.3 / 0.1 < 3 in floats
    # read_frames, data.py's dialogues and infer.py's --ask check all count with it
    monkeypatch.setattr(mmduet2, "count_frames", lambda duration, interval: 2)
    assert len(list(mmduet2.read_frames(v["seven"], 1.0))) == 2
    assert data.dialogue_times(7.0, 1.0, 1) == (2, [1.0, 2.0])
    assert infer.check_video(v["seven"], 1.0)[1] == 2  # the frame count --ask times are checked against


@pytest.mark.parametrize("width, height", [(8, 8), (16, 16), (12, 6), (40, 14)])
def test_frames_of_tiny_videos_are_rgb(tmp_path, tiny, width, height):
    # decord returned (8, 8, 12) and (16, 16, 6) here: FFmpeg's padded rows read as extra channels
    path = ramp_video(tmp_path / "small.mp4", width, height)
    frames = list(mmduet2.read_frames(path, 0.5))  # frames 0, 5
    for (t, frame), k in zip(frames, (0, 5)):
        assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
        assert np.abs(frame.astype(int) - ramp(width, height, k)).max() <= 4
    tiny[1].image_processor(images=[frames[0][1]])  # "Unable to infer channel dimension format" before


def test_a_video_damaged_mid_stream_is_a_one_line_error(tmp_path):
    path = damaged_video(tmp_path / "damaged.mp4")
    assert mmduet2.video_duration(path) == 10.0  # it opens fine: the damage shows only when decoding
    with pytest.raises(ValueError, match="cannot decode video .* \\(reading its frame at"):
        list(mmduet2.read_frames(path, 1.0))  # decord's DECORDError before; where it fails varies run to run


# ----------------------------------------------------------------------------
# the command, in-process and as a user runs it

def test_single_video_cli(videos, tmp_path, fast_load, capsys):
    _, v = videos
    out = tmp_path / "pred.jsonl"
    summary = infer.main([v["a"], "--model", "tiny", "--question", "What changes?", "--ask", "3:And now?",
                          "--frames-per-turn", "2", "--max-new-tokens", "4", "--out", str(out)])
    printed, progress = capsys.readouterr()
    assert "<= 128 LLM tokens per frame (this video: 84x84 -> 9 tokens)" in printed
    assert summary["turns"] == 3 and len(summary["latencies"]) == 3 and "3 turns" in printed
    assert "turns:" in progress and "turns:" not in printed  # the turn bar goes to stderr (its drawing is tqdm's)
    [rec] = records(out)
    check_record(rec, "a", turn_times=[2.0, 4.0, 6.0])  # 6 s, 1 s interval, 2 frames per turn
    users = [(r["time"], r["content"]) for r in rec["model_response_list"] if r["role"] == "user"]
    assert users == [(2.0, "What changes?"), (4.0, "And now?")]
    replies = [r for r in rec["model_response_list"] if r["role"] == "assistant"]
    assert len(replies) == summary["replies"] and printed.count("] ") >= len(replies)  # printed as "[00:02] ..."
    assert evaluate.load_predictions(str(out)) == {"a": [(r["time"], r["content"].strip()) for r in replies]}


def test_single_video_out_is_never_overwritten_unasked(videos, tmp_path, fast_load, scripted):
    _, v = videos
    out = tmp_path / "pred.jsonl"
    out.write_text("an earlier run's predictions\n")
    with pytest.raises(SystemExit, match="exists: give another file, or --overwrite"):
        infer.main([v["b"], "--model", "tiny", "--out", str(out)])
    assert out.read_text() == "an earlier run's predictions\n" and not scripted  # refused before streaming
    infer.main([v["b"], "--model", "tiny", "--out", str(out), "--overwrite"])
    check_record(records(out)[0], "b", turn_times=[1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("how", ["damaged", "ctrl-c"])
def test_single_video_keeps_what_was_streamed(videos, tmp_path, fast_load, scripted, damaged, monkeypatch,
                                              capsys, how):
    _, v = videos
    out = tmp_path / "pred.jsonl"
    if how == "damaged":
        damaged.add(v["a"])
    else:
        ctrl_c_at(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        infer.main([v["a"], "--model", "tiny", "--out", str(out)])
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == (1 if how == "damaged" else 130)
    assert said.startswith("infer.py: " + ("cannot decode video" if how == "damaged" else "interrupted after 2 of 6 turns"))
    assert said.endswith(f"the predictions of the 2 turns streamed are in {out}")
    [rec] = records(out)  # the turns at 1 s and 2 s (frames 0 and 1) were answered before it stopped
    assert [(r["time"], r["content"]) for r in rec["model_response_list"]] == [(1.0, "Seen."), (2.0, "Seen.")]


def test_command_line_subprocess(videos, tmp_path):
    _, v = videos
    out = tmp_path / "pred.jsonl"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), v["b"], "--model", "tiny",
                          "--question", "What changes?", "--max-new-tokens", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "5 turns" in run.stdout and "real-time factor" in run.stdout
    [rec] = records(out)
    check_record(rec, "b", turn_times=[1.0, 2.0, 3.0, 4.0, 5.0])


def hub_env(tmp_path, **env):
    """The environment of a user with no network: an empty hub cache, the hub's address a closed local port."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**base, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", **env}


def test_released_model_without_network_is_one_quick_line(videos, tmp_path):
    _, v = videos
    took = {}
    for mode, env in (("offline", {"HF_HUB_OFFLINE": "1"}), ("no network", {})):
        start = time.perf_counter()
        run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), v["b"]], env=hub_env(tmp_path, **env),
                             capture_output=True, text=True, timeout=120)
        took[mode] = time.perf_counter() - start
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr  # no retry messages
        assert run.stderr.startswith("infer.py: cannot load model 'wangyueqian/MMDuet2'")
        assert "hf download wangyueqian/MMDuet2 --local-dir DIR" in run.stderr  # the CLI the pinned hub ships
    # without network the hub's own retries sleep 1 + 2 + 4 + 8 + 8 = 23 s; HF_HUB_OFFLINE never tries.
    # Compared with each other, not with a fixed time: most of each run is importing torch on a busy CPU
    assert took["no network"] < took["offline"] + 15, took


def test_a_model_in_the_hub_cache_loads_without_network(videos, tmp_path, tiny):
    _, v = videos
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny"  # the hub cache layout: refs/main names a snapshot
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for part in tiny:
        part.save_pretrained(repo / "snapshots" / ("0" * 40))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), v["b"], "--model", "someone/tiny",
                          "--max-new-tokens", "2"], env=hub_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "model someone/tiny on cpu" in run.stdout and "5 turns" in run.stdout


# ----------------------------------------------------------------------------
# live sources: a network stream (a local HTTP server), real-time pacing, typed questions, clean ends

@contextlib.contextmanager
def http_video(path, cut=None):
    """Serve the file at `path` on 127.0.0.1 as /v.mp4. With `cut`, the server sends only that many bytes
    of it, then closes the connection (having announced the whole length): a connection dropped mid-stream."""
    data = open(path, "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])

        def log_message(self, *args):  # no request log on the test's stderr
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v.mp4"
    finally:
        server.shutdown()
        server.server_close()


def index_first(src, dst):
    """Copy an mp4 with its index (moov) before its frames, as a streamed mp4 has it: cut part-way, the
    frames before the cut still decode (write_video puts the index at the end: nothing would open)."""
    import av
    with av.open(src) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:  # the demuxer's closing empty packet
                packet.stream = stream
                out.mux(packet)
    return str(dst)


def test_a_network_stream_gives_the_files_frames(videos):
    _, v = videos
    with http_video(v["seven"]) as url:
        streamed = list(live.live_frames(url, 1.0))
    offline = list(mmduet2.read_frames(v["seven"], 1.0))
    assert [t for t, _ in streamed] == [t for t, _ in offline] == [0, 1, 2, 3, 4, 5, 6]  # its presentation times
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(streamed, offline))  # decoded alike, pixel for pixel
    assert live.is_live(url) and live.is_live("/dev/video0") and live.is_live("0", "avfoundation")
    assert not live.is_live(v["seven"])


@pytest.mark.parametrize("kind", ["variable frame rate", "portrait"])
def test_a_phone_video_gives_the_same_frames_from_a_file_and_a_stream(tmp_path, kind):
    # a phone's: 30 fps, then 2 fps to 20 s; or 3 s stored sideways with "rotate 90" in its display matrix
    times = [i / 30 for i in range(300)] + [10 + i / 2 for i in range(20)] if kind == "variable frame rate" \
        else [i / 10 for i in range(30)]
    rotation = 90 if kind == "portrait" else 0
    path = write_timed_video(tmp_path / "phone.mp4", times, rotation=rotation)
    for interval in (1.0, 0.5):
        offline = list(mmduet2.read_frames(path, interval))
        with http_video(path) as url:
            streamed = list(live.live_frames(url, interval))
        assert [t for t, _ in streamed] == [t for t, _ in offline]  # the same sample times, to the video's end
        for (t, a), (_, b) in zip(streamed, offline):
            assert a.shape == b.shape == ((128, 96, 3) if rotation else (96, 128, 3))  # upright, both
            assert np.array_equal(a, b)  # the same frame, decoded alike
            assert frame_index(a, rotation) == min(range(len(times)), key=lambda i: abs(times[i] - t))


def test_a_slow_model_drops_frames_and_answers_as_offline_on_the_frames_kept(tmp_path, tiny):
    model, processor = tiny
    video = write_video(tmp_path / "v.mp4", 3)  # 30 frames at 10 fps, all taken at a 0.1 s interval
    decode = dict(config=engine.decoding(processor, max_new_tokens=3), fast_silence=True)
    stream = engine.Stream(model, processor)
    turn = stream.turn
    stream.turn = lambda *a, **k: time.sleep(0.3) or turn(*a, **k)  # 3x slower than the stream
    feed = live.Feed(mmduet2.read_frames(video, 0.1), 0.1, 1)  # --realtime: the file played as live
    responses, latencies = infer.stream_video(stream, feed, user_turns=[(0, "What changes?")], keep_silent=True,
                                              **decode)
    assert feed.dropped > 0 and feed.taken + feed.dropped == 30  # every frame taken or dropped, none queued
    assert len(latencies) == len(feed.lags) == feed.taken  # one frame per turn
    # bounded: about one turn behind (0.4 s here). Without dropping, the last reply would come 30 x 0.3 - 3 = 6 s
    # after its frame, and each one later than the one before: a generous bound a busy machine still meets
    assert max(feed.lags) < 2.0, feed.lags
    # the same model, offline, on the frames that were kept (frame k at k x 0.1 s has its turn at (k + 1) x 0.1 s)
    frames = {round(t + 0.1, 6): frame for t, frame in mmduet2.read_frames(video, 0.1)}
    replies = [r for r in responses if r["role"] == "assistant"]
    offline = engine.Stream(model, processor)
    assert [r["content"] for r in replies] == [
        offline.turn([frames[r["time"]]], "What changes?" if i == 0 else None, **decode).text.strip()
        for i, r in enumerate(replies)]


def test_watching_a_network_stream_as_a_user(tmp_path):
    out = tmp_path / "pred.jsonl"
    with http_video(write_video(tmp_path / "v.mp4", 3)) as url:
        run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), url, "--realtime", "--model", "tiny",
                              "--frames-per-turn", "2", "--max-new-tokens", "3", "--question", "What changes?",
                              "--out", str(out)],
                             input="Is it red?\n", capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    taken, dropped = map(int, re.search(r"frames: (\d+) taken, (\d+) dropped", run.stdout).groups())
    assert taken + dropped == 3 and "reply lag behind the stream: mean" in run.stdout  # 3 s at a 1 s interval
    assert "real-time factor" in run.stdout and "turns: " in run.stderr  # the summary, a turn counter
    [rec] = records(out)
    check_record(rec, "v", turn_times=[1.0, 2.0, 3.0])  # 2 frames per turn: at 2 and 3 s, unless frames are dropped
    users = [r for r in rec["model_response_list"] if r["role"] == "user"]
    # the line on stdin was there before the stream began: it joins the first turn, after the question
    assert users[0]["content"] == "What changes?\nIs it red?" and "] > What changes?" in run.stdout
    replies = [r for r in rec["model_response_list"] if r["role"] == "assistant"]
    # each reply printed as it came, at its time on the stream's clock ("[mm:ss] > text" lines are user texts)
    assert re.findall(r"^\[([\d:.]+)\] (?!> )", run.stdout, re.M) == [infer.clock(r["time"]) for r in replies]


def test_questions_typed_while_it_plays_join_the_turn_being_fed(tmp_path, fast_load, monkeypatch, capsys):
    lines = queue.Queue()  # the stdin reader: a line a question, blank lines skipped
    live.read_questions(io.StringIO("Is it red?\n\n  Where is it now? \n"), lines)
    assert [lines.get_nowait() for _ in range(lines.qsize())] == ["Is it red?", "Where is it now?"]

    typed = {}  # the queue main() reads stdin into: the scripted model "types" into it during a turn

    class Typist(ScriptedStream):
        def turn(self, frames, text=None, **decode):
            if len(self.turns) == 1:  # while the second turn is being answered, two lines are typed
                typed["q"].put("Is it red?")
                typed["q"].put("Where is it now?")
            return super().turn(frames, text, **decode)
    streams = []
    monkeypatch.setattr(engine, "Stream", lambda model, processor: streams.append(Typist(["Seen."])) or streams[-1])
    monkeypatch.setattr(engine, "Window", NoWindow)
    monkeypatch.setattr(live, "read_questions", lambda lines, questions: typed.update(q=questions))
    out = tmp_path / "pred.jsonl"
    infer.main([write_video(tmp_path / "v.mp4", 2), "--realtime", "--interval", "0.5", "--model", "tiny", "--question", "What changes?",
                "--out", str(out)])
    [rec] = records(out)
    replies = [r["time"] for r in rec["model_response_list"] if r["role"] == "assistant"]
    users = [(r["time"], r["content"]) for r in rec["model_response_list"] if r["role"] == "user"]
    # the question at t=0 joins the first turn; both typed lines the third, the turn fed after they were typed
    assert users == [(replies[0], "What changes?"), (replies[2], "Is it red?\nWhere is it now?")]  # mmduet2.turn_text
    assert streams[0].turns[2][1] == "Is it red?\nWhere is it now?"
    assert f"[{infer.clock(replies[2])}] > Is it red?" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["connection cut", "ctrl-c"])
def test_a_live_stream_that_ends_early_keeps_what_was_streamed(videos, tmp_path, fast_load, scripted, monkeypatch,
                                                               capsys, how):
    _, v = videos
    video = index_first(v["a"], tmp_path / "a.mp4")
    cut = os.path.getsize(video) * 2 // 3 if how == "connection cut" else None  # the first 2.4 s of 6 come through
    out = tmp_path / "pred.jsonl"
    if how == "ctrl-c":
        ctrl_c_at(monkeypatch, 3)
    with http_video(video, cut) as url:
        arrived = []  # the frames that come through before the cut (all of them, uncut)
        with pytest.raises(ConnectionError) if cut else contextlib.nullcontext():
            for t, _ in live.live_frames(url, 0.25):
                arrived.append(t)
        with pytest.raises(SystemExit) as e:
            infer.main([url, "--model", "tiny", "--interval", "0.25", "--out", str(out)])
    printed, said = capsys.readouterr()
    said = said.strip().splitlines()[-1]
    [rec] = records(out)
    n = len(rec["model_response_list"])  # the scripted model says "Seen." every turn
    assert n >= 2 and {r["content"] for r in rec["model_response_list"]} == {"Seen."}
    taken, dropped = map(int, re.search(r"frames: (\d+) taken, (\d+) dropped", printed).groups())  # the report
    assert said.endswith(f"; the predictions of the {n} turns streamed are in {out}") and taken == n
    if how == "ctrl-c":
        assert e.value.code == 130 and said.startswith("infer.py: interrupted after 2 turns") and n == 2
    else:  # every frame that came through before the cut was answered (or dropped, on a busy machine)
        assert e.value.code == 1 and said.startswith(f"infer.py: {url} broke off after ")
        assert 2 <= len(arrived) < 24 and taken + dropped == len(arrived)


# ----------------------------------------------------------------------------
# the benchmark protocol

def anno(tmp_path, examples):
    path = tmp_path / "anno.json"
    path.write_text(json.dumps(examples))
    return str(path)


def example(qid, video, duration, spans, subtitles=()):
    return {"video": video, "question_id": qid, "duration": duration,
            "conversation": [{"role": "user", "content": f"Question {qid}?", "time": 0}]
            + [{"role": "user", "content": f"Subtitle: {s}", "time": t} for t, s in subtitles],
            "answer": [{"role": "assistant", "content": "x", "related_timespan": sp, "reply_timespan": sp} for sp in spans]}


def run_record(out, skipped=None, **settings):
    """Write the sidecar infer.py keeps beside a benchmark's --out: the settings that made it, the skipped examples."""
    made = {"model": "tiny", "interval": 1.0, "frames_per_turn": 1, "frame_tokens": 128, "max_new_tokens": 100}
    with open(f"{out}.run.json", "w") as f:
        json.dump({"settings": {**made, **settings}, "skipped": skipped or {}}, f)


def test_benchmark_runs_skips_and_resumes(videos, tmp_path, fast_load, capsys, monkeypatch):
    d, _ = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0], [1.5, 3.2]], subtitles=[(2.5, "Hi."), (5.5, "Late.")]),
                           example("q-missing", "missing.mp4", 9.0, [[0, 4.0]]),
                           example("q-b", "b.mp4", 5.0, [[1.0, 30.0]])])
    out = tmp_path / "preds.jsonl"
    argv = ["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--max-new-tokens", "3", "--out", str(out)]
    summary = infer.main(argv)
    printed, progress = capsys.readouterr()
    assert summary["done"] == 2 and summary["skipped"] == ["q-missing"]
    assert "skipped q-missing: video not found" in printed and "done 2 examples, skipped 1" in printed
    assert "; 84x84 -> 9 tokens/frame (2 videos)" in printed  # each video's frame size and its cost
    # a turn bar inside each video, on stderr, named by its frame size (its drawing is tqdm's)
    assert "84x84 -> 9 tokens/frame" in progress
    sidecar = json.load(open(f"{out}.run.json"))
    assert sidecar["settings"] == {"model": "tiny", "interval": 1.0, "frames_per_turn": 1, "frame_tokens": 128,
                                   "max_new_tokens": 3}
    assert sidecar["skipped"].keys() == {"q-missing"} and "video not found" in sidecar["skipped"]["q-missing"]
    first_run = out.read_text()
    rec_a, rec_b = records(out)
    # q-a: last gold span ends at 3.2 s -> ceil(3.2) = 4 frames; the subtitle at 5.5 s is never reached
    check_record(rec_a, "q-a", turn_times=[1.0, 2.0, 3.0, 4.0])
    assert [(r["time"], r["content"]) for r in rec_a["model_response_list"] if r["role"] == "user"] == \
        [(1.0, "Question q-a?"), (3.0, "Subtitle: Hi.")]
    # q-b: the span runs past the video, so the whole 5 s video is streamed
    check_record(rec_b, "q-b", turn_times=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert max(r["time"] for r in rec_b["model_response_list"]) <= 5.0
    assert evaluate.load_predictions(str(out)).keys() == {"q-a", "q-b"}

    # a second run does no new model work and keeps the first run's lines
    monkeypatch.setattr(engine.Stream, "turn", lambda *a, **k: pytest.fail("resumed run streamed again"))
    summary = infer.main(argv)
    assert summary["done"] == 0 and out.read_text() == first_run
    printed = capsys.readouterr().out  # q-missing is not tried again either
    assert f"3 examples: 2 already in {out}, 1 skipped by an earlier run (reasons in {out}.run.json; " \
           "--retry-skipped runs them), 0 to run" in printed


def test_a_benchmark_where_every_example_is_skipped_fails(videos, tmp_path, fast_load):
    # an --interval no video can take skipped every example, after the model load, and exited 0 with an empty file
    d, _ = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0]]), example("q-b", "b.mp4", 5.0, [[1.0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    with pytest.raises(SystemExit) as e:
        infer.main(["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--interval", "0.001", "--out", str(out)])
    assert str(e.value.code).startswith(f"infer.py: no example has a prediction in {out}: each was skipped")
    assert out.read_text() == "" and json.load(open(f"{out}.run.json"))["skipped"].keys() == {"q-a", "q-b"}


def test_a_second_run_on_the_same_out_is_refused(videos, tmp_path, fast_load, scripted):
    # two benchmark runs on one --out both wrote every record (or interleaved two settings' records)
    d, v = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    out.write_text('{"question_id": "q-a"')  # the other run's record, half written
    spelled = str(tmp_path / "." / "preds.jsonl")  # another spelling of the same file
    for argv in (["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", spelled],
                 [v["a"], "--model", "tiny", "--overwrite", "--out", spelled]):
        with another_run_writing(out) as pid:
            with pytest.raises(SystemExit) as e:
                infer.main(argv)
        assert str(e.value.code).startswith(f"infer.py: {spelled} is being written by another run (pid {pid} on ")
        assert out.read_text() == '{"question_id": "q-a"' and not os.path.exists(f"{out}.run.json")  # untouched
    assert infer.main(argv)["turns"] == 6  # once it is gone (killed: no lock is left behind), the run goes ahead


def test_benchmark_says_which_gold_its_video_cannot_reach(videos, tmp_path, fast_load, scripted, capsys):
    d, _ = videos
    # a.mp4 lasts 6 s: this gold says 9 s, and its second span starts after the video ends
    gold = anno(tmp_path, [example("q-a", "a.mp4", 9.0, [[0, 2.0], [7.0, 8.0]]), example("q-b", "b.mp4", 5.0, [[1.0, 2.0]])])
    summary = infer.main(["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", str(tmp_path / "p.jsonl")])
    printed = capsys.readouterr().out
    assert "gold warning, q-a: 'duration' is 9 s but the video lasts 6 s (another cut of it?)" in printed
    assert "gold warning, q-a: reply span 1 [7, 8] starts after the video ends (6 s): no reply can reach it" in printed
    assert "q-b" not in printed.split("done")[0].split("examples:")[1]  # nothing said about the good one
    assert summary["done"] == 2 and summary["gold_warnings"] == 1 and "1 with gold warnings (above)" in printed


@pytest.mark.parametrize("tail, said", [("\n", None), ("", "its last record lacked a newline: added one"),
                                        ('\n{"question_id": "q-b", "model_res', "its last line was cut short")])
def test_benchmark_resumes_after_a_partial_run(videos, tmp_path, fast_load, capsys, tail, said):
    d, _ = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0]]), example("q-b", "b.mp4", 5.0, [[0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    # "": a last record without its newline (cut just before it, or written by hand): q-b's record used to
    # be appended on the same line, and neither could be read back. A cut record (a run killed mid-write)
    # stopped the rerun ("delete that line"), although the README said it was repaired
    out.write_text(json.dumps({"question_id": "q-a", "model_response_list": []}) + tail)
    run_record(out, frames_per_turn=2, max_new_tokens=2)
    summary = infer.main(["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--max-new-tokens", "2",
                          "--frames-per-turn", "2", "--out", str(out)])
    assert (f"{out}: {said}" in capsys.readouterr().out) if said else "its last" not in capsys.readouterr().out
    assert summary["done"] == 1
    first, second = records(out)
    assert first == {"question_id": "q-a", "model_response_list": []}
    check_record(second, "q-b", turn_times=[2.0])  # 2 frames (span ends at 2 s) = one 2-frame turn


def test_a_full_disk_is_one_line_and_the_file_keeps_whole_records(videos, tmp_path, fast_load, scripted, monkeypatch):
    d, _ = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0]]), example("q-b", "b.mp4", 5.0, [[0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    argv = ["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", str(out)]
    write = os.write

    def full_disk(fd, data):  # q-b's record: half of it gets onto the disk, then it is full
        if bytes(data).startswith(b'{"question_id": "q-b"'):
            write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SystemExit) as e:
        infer.main(argv)
    assert str(e.value.code) == (f"infer.py: cannot write {out} (No space left on device): 1 examples were written in "
                                 "this run, as whole records; free some space and rerun the same command: it resumes")
    assert [r["question_id"] for r in records(out)] == ["q-a"] and out.read_text().endswith("\n")  # no half of q-b
    monkeypatch.setattr(os, "write", write)  # space freed: the rerun writes q-b, once
    assert infer.main(argv)["done"] == 1 and [r["question_id"] for r in records(out)] == ["q-a", "q-b"]
    # one video: its file is written whole at the end (write_atomic), and a full disk leaves the old one as it was
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(SystemExit) as e:
        infer.main([str(d / "a.mp4"), "--model", "tiny", "--out", str(out), "--overwrite"])
    assert str(e.value.code) == (f"infer.py: cannot write {out} (No space left on device): the predictions of the "
                                 "6 turns streamed are not saved; free some space and rerun")
    assert [r["question_id"] for r in records(out)] == ["q-a", "q-b"] and not os.path.exists(f"{out}.tmp")


def test_benchmark_skips_a_video_that_fails_mid_stream_and_remembers_it(videos, tmp_path, fast_load, scripted,
                                                                         damaged, capsys):
    d, v = videos
    damaged.add(v["seven"])
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 3.0]]), example("q-bad", "seven.mp4", 7.0, [[0, 5.0]]),
                           example("q-b", "b.mp4", 5.0, [[0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    argv = ["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", str(out)]
    summary = infer.main(argv)  # a DECORDError traceback here, before
    assert summary["done"] == 2 and summary["skipped"] == ["q-bad"]
    assert f"skipped q-bad: cannot decode video {v['seven']} (reading its frame at 2 s)" in capsys.readouterr().out
    assert [r["question_id"] for r in records(out)] == ["q-a", "q-b"]  # nothing of q-bad's two turns is written
    assert "reading its frame at 2 s" in json.load(open(f"{out}.run.json"))["skipped"]["q-bad"]

    n_streams = len(scripted)
    summary = infer.main(argv)  # a rerun does not stream it again...
    assert summary["done"] == 0 and len(scripted) == n_streams
    summary = infer.main(argv + ["--retry-skipped"])  # ... unless asked
    assert summary["skipped"] == ["q-bad"] and len(scripted) == n_streams + 1
    damaged.clear()  # the video is mended
    summary = infer.main(argv + ["--retry-skipped"])
    assert summary["done"] == 1 and summary["skipped"] == []
    assert [r["question_id"] for r in records(out)] == ["q-a", "q-b", "q-bad"]
    assert json.load(open(f"{out}.run.json"))["skipped"] == {}


def test_benchmark_ctrl_c_keeps_the_finished_examples(videos, tmp_path, fast_load, scripted, monkeypatch, capsys):
    d, _ = videos
    gold = anno(tmp_path, [example("q-a", "a.mp4", 6.0, [[0, 2.0]]), example("q-b", "b.mp4", 5.0, [[0, 2.0]])])
    out = tmp_path / "preds.jsonl"
    argv = ["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", str(out)]
    ctrl_c_at(monkeypatch, 3)  # q-a's two turns, then Ctrl-C in q-b's first
    with pytest.raises(SystemExit) as e:
        infer.main(argv)  # a KeyboardInterrupt traceback, before
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"infer.py: interrupted: 1 examples written to {out} in this run (1 in all); "
        "q-b was in progress, is not written, and runs on a rerun")
    assert [r["question_id"] for r in records(out)] == ["q-a"]
    assert infer.main(argv)["done"] == 1  # the rerun's turns count on past the interrupted third and [r["question_id"] for r in records(out)] == ["q-a", "q-b"]


# ----------------------------------------------------------------------------
# the paper's other two benchmarks (benchmarks.py): StreamingBench Proactive Output, offline QA

class PixelStream(ScriptedStream):
    """A ScriptedStream that also keeps the system prompt it was made with and each turn's first frame's
    mean value (write_video fills frame i with (7·i) % 256 in its red channel: the frame's index shows)."""
    made = []

    def __init__(self, model, processor, system=mmduet2.SYSTEM_PROMPT, script=("Seen 3.",)):
        super().__init__(list(script))
        self.system, self.reds = system, []
        PixelStream.made.append(self)

    def turn(self, frames, text=None, **decode):
        self.reds.append(float(frames[0][:, :, 0].mean()))
        return super().turn(frames, text, **decode)


def test_streamingbench_runs_from_its_clip_to_gt_plus_4_and_scores(videos, tmp_path, fast_load, monkeypatch, capsys):
    d, _ = videos
    # seven.mp4 (7 s): q0 asked at 1 s, truth at 2 s -> frames at 1..5 s, turns at 2..6 s (gt + 4), question in the first;
    # q1 asked at 0 s, truth at 3 s -> frames at 0..6 s, turns at 1..7 s (gt + 4 = 7 s, the video's end)
    sb = tmp_path / "questions_proactive.json"
    sb.write_text(json.dumps([{"video_path": "./seven.mp4", "questions": [
        {"task_type": "Proactive Output", "question": 'When it is bright, output "3".', "time_stamp": "00:00:01",
         "ground_truth_time_stamp": "00:00:02", "ground_truth_output": "3"},
        {"task_type": "Proactive Output", "question": 'When it is dark, output "4".', "time_stamp": "00:00:00",
         "ground_truth_time_stamp": "00:00:03", "ground_truth_output": "4"}]}]))
    PixelStream.made = []
    monkeypatch.setattr(engine, "Stream", PixelStream)
    out = tmp_path / "sb.jsonl"
    argv = ["--benchmark", str(sb), "--videos", str(d), "--model", "tiny", "--out", str(out)]
    assert infer.main(argv)["done"] == 2
    q0, q1 = records(out)
    check_record(q0, "seven_q0", turn_times=[2.0, 3.0, 4.0, 5.0, 6.0])
    assert q0["model_response_list"][0] == {"role": "user", "content": 'When it is bright, output "3".', "time": 2.0}
    assert [r["time"] for r in q0["model_response_list"] if r["role"] == "assistant"] == [2.0, 3.0, 4.0, 5.0, 6.0]
    check_record(q1, "seven_q1", turn_times=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    # the clip starts at time_stamp: q0's first frame is the video's frame at 1 s (index 10, red 70), q1's at 0 s
    assert abs(PixelStream.made[0].reds[0] - 70) < 8 and abs(PixelStream.made[1].reds[0] - 0) < 8
    assert [s.system for s in PixelStream.made] == [mmduet2.SYSTEM_PROMPT] * 2  # the proactive prompt, as always
    capsys.readouterr()
    # the eval, the official way: q0's first reply at 2 s (gt 2) says "Seen 3." -> time and answer; q1's at 1 s
    # (gt 3, -2 s) -> on time, but "4" is not in it
    summary = evaluate.main(["--gold", str(sb), "--pred", str(out), "--json", str(tmp_path / "sb.json")])
    printed = capsys.readouterr().out
    assert "time accuracy x100 (first reply within +-2 s): 100.00 (2 of 2)" in printed
    assert "answer accuracy x100 (on time and the output in it; the paper's Table 5): 50.00 (1 of 2)" in printed
    assert json.load(open(tmp_path / "sb.json"))["answer_accuracy"] == summary["answer_accuracy"] == 50.0
    # resumable as every benchmark run: a second run streams nothing
    monkeypatch.setattr(PixelStream, "turn", lambda *a, **k: pytest.fail("resumed run streamed again"))
    assert infer.main(argv)["done"] == 0


def test_offline_qa_is_one_turn_under_the_default_system_prompt(videos, tmp_path, fast_load, monkeypatch, capsys):
    d, _ = videos
    lines = [data.offline_dialogue("o1", "seven.mp4", 7.0, "List the colours.", "Red, blue."),
             data.offline_dialogue("o2", "a.mp4", 6.0, "List the colours.", "Green.")]
    gold = tmp_path / "offline.jsonl"
    gold.write_text("".join(json.dumps(line) + "\n" for line in lines))
    PixelStream.made = []
    monkeypatch.setattr(engine, "Stream", lambda model, processor, system=mmduet2.SYSTEM_PROMPT:
                        PixelStream(model, processor, system, script=("red, BLUE",)))
    out = tmp_path / "off.jsonl"
    assert infer.main(["--benchmark", str(gold), "--videos", str(d), "--model", "tiny", "--out", str(out)])["done"] == 2
    o1, o2 = records(out)
    t = lines[0]["messages"][1]["time"]  # after the dialogue's 14 frames (7 s, 14 frames at 0.4828 s)
    assert o1 == {"question_id": "o1", "model_response_list": [{"role": "user", "content": "List the colours.", "time": t},
                                                                {"role": "assistant", "content": "red, BLUE", "time": t}]}
    # one turn each, with every frame of the dialogue, under Qwen's default system prompt
    assert [s.turns for s in PixelStream.made] == [[(14, "List the colours.")], [(12, "List the colours.")]]
    assert [s.system for s in PixelStream.made] == [mmduet2.DEFAULT_SYSTEM_PROMPT] * 2
    capsys.readouterr()
    summary = evaluate.main(["--gold", str(gold), "--pred", str(out)])
    assert (summary["correct"], summary["accuracy"]) == (1, 50.0)  # o1 right (case and punctuation aside), o2 not
    assert "accuracy (exact match, case and punctuation aside) x100: 50.00 (1 of 2)" in capsys.readouterr().out


def test_offline_qa_with_the_tiny_model(videos, tmp_path, fast_load):
    """The real engine on the offline path: one answer per dialogue, in the prediction format."""
    d, _ = videos
    gold = tmp_path / "offline.jsonl"
    gold.write_text(json.dumps(data.offline_dialogue("o1", "seven.mp4", 7.0, "List the colours.", "Red.")) + "\n")
    out = tmp_path / "off.jsonl"
    infer.main(["--benchmark", str(gold), "--videos", str(d), "--model", "tiny", "--max-new-tokens", "3", "--out", str(out)])
    (rec,) = records(out)
    assert [r["role"] for r in rec["model_response_list"]] == ["user", "assistant"]


# ----------------------------------------------------------------------------
# bad input: one line, "infer.py: ...", before any model loads

def bad_anno_cases(tmp_path, d):
    (tmp_path / "notjson.json").write_text("[{oops")
    (tmp_path / "dict.json").write_text(json.dumps({"video": "a.mp4"}))
    (tmp_path / "ints.json").write_text("[1, 2]")
    (tmp_path / "noanswer.json").write_text(json.dumps([{"video": "a.mp4", "question_id": "q", "conversation": []}]))
    (tmp_path / "badspan.json").write_text(json.dumps([{**example("q", "a.mp4", 6.0, [[0, 2]]),
                                                        "answer": [{"content": "x", "reply_timespan": "soon"}]}]))
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)  # not text at all
    (tmp_path / "novideo.json").write_text(json.dumps([{**example("q", "a.mp4", 6.0, [[0, 2]]), "video": None}]))
    (tmp_path / "badtime.json").write_text(json.dumps([example("q", "a.mp4", 6.0, [[0, 2]], subtitles=[("soon", "Hi")])]))
    return {name: ["--benchmark", str(tmp_path / f"{name}.json"), "--videos", str(d), "--out", str(tmp_path / "p.jsonl")]
            for name in ("notjson", "dict", "ints", "noanswer", "badspan", "binary", "novideo", "badtime")}


def stream_without_frames(path):
    """An mp4 with a video stream and not one frame in it (PyAV writes the header, then closes)."""
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 84
        out.start_encoding()
    return str(path)


def resume_cases(tmp_path, d):
    """An --out left by an earlier run that this one must not append to: other settings, no record of them,
    or another benchmark's predictions."""
    gold = anno(tmp_path, [example("q", "a.mp4", 6.0, [[0, 2]])])
    cases = {}
    for name, qid, settings in (("other-model", "q", {"model": "someone/other"}), ("no-record", "q", None),
                                ("other-settings", "q", {"interval": 2.0, "frame_tokens": 64}),
                                ("realtime", "q", {"realtime": True}),  # played as live: frames were dropped
                                ("context-frames", "q", {"context_frames": 90}),  # a bounded context
                                ("other-benchmark", "q-from-EGO", {})):
        out = tmp_path / f"{name}.jsonl"
        out.write_text(json.dumps({"question_id": qid, "model_response_list": []}) + "\n")
        if settings is not None:
            run_record(out, **settings)
        cases[f"resume-{name}"] = ["--benchmark", gold, "--videos", str(d), "--model", "tiny", "--out", str(out)]
    return cases


@pytest.mark.parametrize("case, message", [
    ("missing", "video not found"),
    ("junk", "cannot decode video"),
    ("short", "shorter than one frame interval"),
    ("ask-no-colon", "is not SECONDS:TEXT"),
    ("ask-not-a-number", "is not SECONDS:TEXT"),
    ("ask-no-text", "is not SECONDS:TEXT"),
    ("ask-negative", "is not SECONDS:TEXT"),
    ("ask-late", "past the end of the video"),
    ("model-folder", "model folder not found"),
    ("no-input", "give either a VIDEO or --benchmark"),
    ("benchmark-no-videos", "videos folder not found"),
    ("benchmark-no-out", "needs --out"),
    ("notjson", "not valid JSON"),
    ("dict", "expected a non-empty JSON list"),
    ("ints", "example 0: missing question_id"),
    ("noanswer", "missing duration, answer"),
    ("badspan", "reply_timespan"),
    ("corrupt-preds", "is not a prediction record"),
    ("out-no-folder", "does not exist (create it first)"),
    ("benchmark-out-no-folder", "does not exist (create it first)"),
    ("out-is-a-folder", "is a folder: give a file name"),
    ("out-is-the-video", "is an input of this run"),
    ("resume-no-record", "has predictions but no"),
    ("resume-other-model", "was made with --model someone/other (this run: tiny): resume with those settings"),
    ("resume-other-settings", "made with --interval 2.0 (this run: 1.0), --frame-tokens 64 (this run: 128)"),
    ("resume-other-benchmark", "not in this benchmark (e.g. 'q-from-EGO')"),
    ("video-is-a-folder", "is a folder, not a video file"),
    ("no-frames-in-stream", "holds no video stream"),
    ("video-is-the-anno", "is not a video: for a benchmark, --benchmark"),
    ("benchmark-is-a-folder", "is a folder: give its anno.json"),
    ("benchmark-is-a-video", "is not UTF-8 text: not a ProactiveVideoQA anno.json"),
    ("device-unknown", "--device gpu is not a torch device"),
    ("device-missing", "CUDA GPUs (use --device cpu)"),
    ("interval-nan", "--interval must be > 0 (and finite)"),
    ("interval-past-the-video", "shorter than one frame interval"),
    ("interval-far-below-the-frame-period", "interval 0.001 s is far below the frame period of"),
    ("binary", "is not UTF-8 text"),
    ("novideo", "example 0 (q): 'video' must be a file name, got None"),
    ("badtime", "example 0 (q) conversation 1: 'time' must be seconds >= 0, got 'soon'"),
    ("stream-refused", "cannot open http://127.0.0.1:9/v.mp4: Connection refused"),
    ("camera-missing", "cannot open /dev/video99: No such file or directory"),
    ("input-format-unknown", "cannot open 0: no container format 'nosuch'"),
    ("benchmark-input-format", "--input-format is for a live SOURCE"),
    ("resume-realtime", "was made with --realtime True (this run: None)"),
    ("resume-context-frames", "was made with --context-frames 90 (this run: None)"),
    ("context-frames-below-a-turn", "--context-frames must be 0 (every frame) or >= --frames-per-turn"),
    ("context-frames-negative", "--context-frames must be 0 (every frame) or >= --frames-per-turn"),
    ("serve-not-host-port", "--serve 8000 is not HOST:PORT (e.g. 127.0.0.1:8000)"),
    ("serve-ipv6", "--serve [::1]:8000 is not HOST:PORT (e.g. 127.0.0.1:8000)"),  # the page's server is IPv4
    ("serve-benchmark", "--serve is for a single VIDEO or live SOURCE"),
    ("serve-port-in-use", "cannot listen there (Address already in use)"),
])
def test_bad_input_is_one_clear_line(videos, tmp_path, monkeypatch, case, message):
    d, v = videos
    monkeypatch.setattr(mmduet2, "load_model", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    # a broken line amid whole ones (a last line cut mid-write is repaired instead: test_benchmark_resumes_...)
    (tmp_path / "preds.jsonl").write_text('{"question_id": "q", "model_response_list": []}\n{"question_id": "q2", "mod\n'
                                          '{"question_id": "q3", "model_response_list": []}\n')
    ok_anno = anno(tmp_path, [example("q", "a.mp4", 6.0, [[0, 2]])])
    busy = socket.create_server(("127.0.0.1", 0))  # a port another program listens on
    argv = {
        "missing": [str(d / "nope.mp4")], "junk": [v["junk"]], "short": [v["short"]],
        "ask-no-colon": [v["a"], "--ask", "What now?"], "ask-not-a-number": [v["a"], "--ask", "soon:What now?"],
        "ask-no-text": [v["a"], "--ask", "3:"], "ask-negative": [v["a"], "--ask", "-1:What now?"],
        "ask-late": [v["a"], "--ask", "6.5:What now?"], "no-input": ["--model", "tiny"],
        "benchmark-no-videos": ["--benchmark", ok_anno, "--out", str(tmp_path / "p.jsonl")],  # no videos/ beside it
        "benchmark-no-out": ["--benchmark", ok_anno, "--videos", str(d)],
        "corrupt-preds": ["--benchmark", ok_anno, "--videos", str(d), "--out", str(tmp_path / "preds.jsonl")],
        "out-no-folder": [v["a"], "--out", str(tmp_path / "no_such_folder" / "p.jsonl")],
        "benchmark-out-no-folder": ["--benchmark", ok_anno, "--videos", str(d), "--out", str(tmp_path / "nope" / "p.jsonl")],
        "out-is-a-folder": [v["a"], "--out", str(tmp_path)],
        "out-is-the-video": [v["a"], "--out", v["a"], "--overwrite"],
        "video-is-a-folder": [str(d)], "no-frames-in-stream": [stream_without_frames(tmp_path / "empty.mp4")],
        "video-is-the-anno": [ok_anno], "benchmark-is-a-folder": ["--benchmark", str(d), "--out", str(tmp_path / "p")],
        "benchmark-is-a-video": ["--benchmark", v["a"], "--videos", str(d), "--out", str(tmp_path / "p.jsonl")],
        "device-unknown": [v["a"], "--device", "gpu"], "device-missing": [v["a"], "--device", "cuda:99"],
        "interval-nan": [v["a"], "--interval", "nan"], "interval-past-the-video": [v["a"], "--interval", "60"],
        "interval-far-below-the-frame-period": [v["a"], "--interval", "0.001"],
        "stream-refused": ["http://127.0.0.1:9/v.mp4"], "camera-missing": ["/dev/video99"],  # port 9: nothing listens
        "input-format-unknown": ["0", "--input-format", "nosuch"],
        "benchmark-input-format": ["--benchmark", ok_anno, "--input-format", "v4l2", "--out", str(tmp_path / "p")],
        "context-frames-below-a-turn": [v["a"], "--frames-per-turn", "2", "--context-frames", "1"],
        "context-frames-negative": [v["a"], "--context-frames", "-3"],
        "serve-ipv6": [v["a"], "--serve", "[::1]:8000"],
        "serve-not-host-port": [v["a"], "--serve", "8000"],
        "serve-benchmark": ["--benchmark", ok_anno, "--serve", "127.0.0.1:8000", "--out", str(tmp_path / "p")],
        "serve-port-in-use": [v["a"], "--serve", f"127.0.0.1:{busy.getsockname()[1]}"],
        **bad_anno_cases(tmp_path, d), **resume_cases(tmp_path, d),
    }.get(case)
    if case == "model-folder":  # the real loader: a folder that does not exist fails before anything loads
        monkeypatch.undo()
        argv = [v["a"], "--model", str(tmp_path / "no_such_checkpoint")]
    with pytest.raises(SystemExit) as e, busy:
        infer.main(argv)
    text = str(e.value.code)
    assert text.startswith("infer.py: ") and message in text and "\n" not in text


def test_home_in_paths_is_expanded(videos, tmp_path, fast_load, scripted, monkeypatch):
    # "~" reaches a script unexpanded when typed --out=~/p.jsonl or quoted: "video not found: ~/a.mp4" before
    d, v = videos
    home = tmp_path / "home"
    (home / "videos").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4"):
        os.symlink(os.path.join(d, name), home / "videos" / name)
    anno(home, [example("q-a", "a.mp4", 6.0, [[0, 2.0]])])
    monkeypatch.setenv("HOME", str(home))
    assert infer.main(["~/videos/a.mp4", "--model", "tiny", "--out", "~/one.jsonl"])["turns"] == 6
    summary = infer.main(["--benchmark", "~/anno.json", "--videos", "~/videos", "--model", "tiny", "--out", "~/p.jsonl"])
    assert summary["done"] == 1
    assert [r["question_id"] for f in ("one.jsonl", "p.jsonl") for r in records(home / f)] == ["a", "q-a"]
    import grpo
    import sft
    assert sft.parse_args(["--data", "~/a.jsonl", "--out", "~/o"]).data == [str(home / "a.jsonl")]
    args = grpo.parse_args(["--init", "~/i", "--anno", "~/anno.json", "--out", "~/o"])
    assert (args.init, args.videos, args.out) == (str(home / "i"), str(home / "videos"), str(home / "o"))
    with pytest.raises(SystemExit, match=f"scenes file not found: {home}/s.jsonl"):
        data.main(["build", "--scenes", "~/s.jsonl", "--out", "~/d", "--llm", "toy"])


def test_an_empty_or_junk_file_is_one_line_and_nothing_else(videos, tmp_path):
    # decord's C++ logger printed "[12:00:00] .../video_reader.cc:83: ERROR opening: ..." before our line
    (tmp_path / "empty.mp4").write_bytes(b"")
    for path in (str(tmp_path / "empty.mp4"), videos[1]["junk"]):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), path, "--model", "tiny"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and run.stderr == f"infer.py: cannot decode video {path}: Error reading {path}\n"


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        infer.main(["video.mp4", "--frames-per-turn", "-1"])
    assert e.value.code == 2  # argparse's code; its usage block is not printed
    assert capsys.readouterr().err == ("infer.py: argument --frames-per-turn: invalid choice: -1 (choose from 1, 2) "
                                       "(infer.py --help lists the flags)\n")


# ----------------------------------------------------------------------------
# a bounded context (--context-frames) and the page (--serve), as a user runs them

def test_a_bounded_context_slides_and_says_what_it_dropped(videos, tmp_path, fast_load, capsys):
    """--context-frames 4 on a 6-frame video at 1 frame a turn: the window is rebuilt, the run says what it
    dropped and what a rebuild cost, and the predictions keep their format (engine's tests hold the logits)."""
    _, v = videos
    out = tmp_path / "pred.jsonl"
    summary = infer.main([v["a"], "--model", "tiny", "--question", "What changes?", "--max-new-tokens", "3",
                          "--context-frames", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert summary["turns"] == 6
    assert re.search(r"context: at most 4 frames; rebuilt 1 times \(each keeping at most 2 frames; median \d+ ms, max \d+ ms\); "
                     r"2 frames dropped, their texts kept as text: 1 questions and the latest \d replies", printed)
    check_record(records(out)[0], "a", turn_times=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def sse_events(response):
    """Yield (event name, data) from a Server-Sent Events response, as a browser's EventSource reads it."""
    name, data = "message", []
    for raw in response:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


def post(url, body, method="POST"):
    """(status, text) of a request to the page; an HTTP error status is an answer too."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_page_shows_the_turns_takes_a_question_and_says_the_stream_ended(tmp_path, fast_load, scripted, monkeypatch):
    """infer.py VIDEO --realtime --serve: the page is served (nothing from another host), /events gives one JSON
    event per turn (silent ones too), a POSTed question joins the next turn fed and is answered there, bad
    requests are answered with a 4xx and the stream goes on, and the end is announced."""
    import http.client
    import urllib.request

    from PIL import Image
    pages = []
    start = live.Page.start
    monkeypatch.setattr(live.Page, "start", lambda self: pages.append(self) or start(self))
    monkeypatch.setattr(live, "read_questions", lambda lines, questions: None)  # no stdin here
    monkeypatch.setattr(engine, "Stream", lambda model, processor: scripted.append(ScriptedStream(["NO REPLY", "Seen."]))
                        or scripted[-1])
    video = write_video(tmp_path / "v.mp4", 4)
    result = {}
    argv = [video, "--realtime", "--interval", "0.25", "--model", "tiny", "--serve", "127.0.0.1:0",
            "--out", str(tmp_path / "p.jsonl")]
    run = threading.Thread(target=lambda: result.update(summary=infer.main(argv)))
    run.start()
    for _ in range(200):
        if pages:
            break
        time.sleep(0.05)
    url = pages[0].url
    with urllib.request.urlopen(url, timeout=10) as r:
        html = r.read().decode()
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "EventSource(\"/events\")" in html and "://" not in html  # self-contained: no other host named
    events, statuses = [], {}
    with urllib.request.urlopen(url + "events", timeout=10) as stream:
        for name, payload in sse_events(stream):
            events.append((name, payload))
            if len(events) == 2:  # a turn in: ask, and try every bad request
                statuses["asked"] = post(url + "question", "Is it red?".encode())
                statuses["empty"] = post(url + "question", b"  ")
                statuses["too long"] = post(url + "question", b"x" * (live.MAX_QUESTION_BYTES + 1))
                statuses["not utf-8"] = post(url + "question", b"\xff\xfe")
                statuses["no such page"] = post(url + "nope", None, "GET")
                statuses["post the page"] = post(url, b"hi")
                statuses["put"] = post(url + "question", b"hi", "PUT")
                c = http.client.HTTPConnection("127.0.0.1", pages[0].httpd.server_address[1], timeout=10)
                c.putrequest("POST", "/question")  # no Content-Length
                c.endheaders()
                statuses["no length"] = c.getresponse().status
                with urllib.request.urlopen(url + "frame.jpg", timeout=10) as r:
                    statuses["frame"] = (r.headers["Content-Type"], Image.open(io.BytesIO(r.read())).size)
                # an EventSource that reconnects sends the id of the last event it had: the stream goes on after it
                again = urllib.request.Request(url + "events", headers={"Last-Event-ID": "1"})
                with urllib.request.urlopen(again, timeout=10) as r:
                    statuses["reconnected"] = next(sse_events(r))[1]["turn"]
            if name == "end":
                break
    run.join(30)
    assert not run.is_alive() and result["summary"]["turns"] == 16  # infer.main ended, and well
    assert len(records(tmp_path / "p.jsonl")) == 1 and statuses["reconnected"] == 2
    assert statuses["asked"][0] == 202 and json.loads(statuses["asked"][1]) == {"queued": "Is it red?"}
    assert [statuses[k][0] for k in ("empty", "too long", "not utf-8", "no such page", "post the page", "put")] == \
        [400, 413, 400, 404, 405, 405] and statuses["no length"] == 411
    assert statuses["frame"] == ("image/jpeg", (84, 84))
    turns = [d for n, d in events if n == "message"]
    assert events[-1] == ("end", {"reason": f"all {len(turns)} turns answered"})
    assert [d["turn"] for d in turns] == list(range(1, len(turns) + 1)) == list(range(1, 17))  # every turn, 4 s / 0.25
    assert [d["silent"] for d in turns] == [d["text"] == "NO REPLY" for d in turns] and any(d["silent"] for d in turns)
    assert all(d["clock"] == infer.clock(d["time"]) for d in turns)
    asked = [d for d in turns if d["question"]]
    assert len(asked) == 1 and asked[0]["question"] == "Is it red?" and asked[0]["turn"] > 2  # a later turn, once
    assert ("Is it red?" in [text for _, text in scripted[0].turns])  # the model got it in that turn
    with pytest.raises(OSError):  # the stream ended: so did the page
        urllib.request.urlopen(url, timeout=5)


def test_a_question_after_the_end_is_refused(monkeypatch):
    page = live.Page("127.0.0.1", 0)
    page.start()
    try:
        page.publish(2.0, [np.zeros((8, 8, 3), np.uint8)], None, engine.Reply("NO REPLY", [], []))
        page.ended = "it ended"
        assert post(page.url + "question", b"Still there?") == (409, "the stream has ended\n")
        assert page.questions.empty()
    finally:
        page.end("done", linger=0)


def test_a_page_closed_mid_answer_prints_nothing(monkeypatch, capfd):
    # a browser that cancels a frame load resets its connection mid-write: socketserver printed a traceback each time
    import http.server
    page = live.Page("127.0.0.1", 0)
    page.start()
    dropped = []

    def reset(self):
        dropped.append(self)
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(http.server.BaseHTTPRequestHandler, "handle", reset)
    try:
        with socket.create_connection(("127.0.0.1", page.httpd.server_address[1]), timeout=10) as s:
            s.sendall(b"GET /frame.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100) == b""  # the handler gave up on it: the connection closes, no answer
    finally:
        page.end("done", linger=0)
    assert len(dropped) == 1 and capfd.readouterr().err == ""
