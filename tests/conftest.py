"""Shared test fixtures: synthetic mp4s and the tiny Qwen2.5-VL, gold examples and a fake OpenAI-compatible
endpoint on 127.0.0.1, all built offline."""
import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmduet2  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA, skipped without it (MMDUET2_TEST_DEVICE=cpu: a dry run on the CPU)")


def write_video(path, seconds, fps=10, size=84, seed=0):
    """A small mp4 whose frame i is filled with a colour that encodes i, plus noise (tools/bench.write_mp4: PyAV,
    or OpenCV where PyAV is missing, as on the GPU machines)."""
    from tools import bench
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(round(seconds * fps)):
        img = np.full((size, size, 3), (i * 7) % 256, np.uint8)
        img[:, :, 1] = rng.integers(0, 255)
        frames.append(img)
    return bench.write_mp4(path, frames, fps)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the random tiny Qwen2.5-VL, on the CPU in fp32 (load_model's default on a GPU
    machine is the GPU in bf16: the GPU tests hold the device to this model as their CPU reference)."""
    return mmduet2.load_model("tiny", dtype=torch.float32, device="cpu")


def random_frames(n, seed=0, size=84):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="session")
def chatty():
    """A tiny model overfit on one dialogue, so greedy decoding is silent on some turns and replies on others."""
    model, processor = mmduet2.load_model("tiny", dtype=torch.float32, device="cpu")  # as `tiny`, on any machine
    frames = random_frames(8, seed=1)
    replies = ["NO REPLY", "A red square appeared on the left.", "NO REPLY", "Blue.",
               "NO REPLY", "NO REPLY", "A green square appeared on the top.", "NO REPLY"]
    messages = []
    for k, reply in enumerate(replies):
        messages += [{"role": "user", "content": mmduet2.IMAGE + ("Tell me whenever a new shape appears." if k == 0 else "")},
                     {"role": "assistant", "content": reply}]
    seq = mmduet2.encode_dialogue(processor, messages, frames)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = -mmduet2.forward_logprobs(model, seq).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, processor, frames, replies


def write_timed_video(path, times, size=(96, 128), rotation=0):
    """An mp4 whose frame i is shown at times[i] seconds (a variable frame rate, as phones record), its
    index written in its pixels (`frame_index` reads it back); rotation: the display matrix's
    counter-clockwise degrees (a portrait phone video is stored landscape, with "rotate 90" beside it).
    Its top-left quarter is white, so a test can see which way up a frame comes."""
    import fractions

    import av
    tb = fractions.Fraction(1, 1000)  # pts in milliseconds
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = tb
        if rotation:
            stream.set_display_rotation(rotation)
        for i, t in enumerate(times):
            img = np.zeros((h, w, 3), np.uint8)
            img[h // 2:, :, 0], img[h // 2:, :, 2] = 8 * (i // 32), 8 * (i % 32)  # the index, in the bottom half
            img[:h // 2, :w // 2] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), tb  # explicit presentation times
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def frame_index(frame, rotation=0):
    """The index write_timed_video wrote into a frame (turned back to how it was stored)."""
    stored = np.rot90(frame, -round(rotation / 90))
    h = stored.shape[0]
    bottom = stored[h // 2 + 4:].reshape(-1, 3).mean(0)  # away from the white quarter's edge
    return int(round(bottom[0] / 8)) * 32 + int(round(bottom[2] / 8))


@contextlib.contextmanager
def another_run_writing(path, folder=False):
    """A second real process that holds `path` as its output (runs.hold_output), as a run writing it would,
    until the block ends, when it is killed with SIGKILL (no clean exit: the kernel must drop its lock).
    Yields its pid."""
    code = ("import sys, runs; runs.hold_output(sys.argv[1], folder=sys.argv[2] == '1'); "
            "print('held', flush=True); sys.stdin.read()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(int(folder))], cwd=root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"  # blocks until it holds the lock: no sleep, no race
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------
# Gold examples and a fake judge endpoint (test_reward.py, test_llm.py, test_evaluate.py)

def example(qid, spans, question="What happens?", duration=60.0):
    """An anno.json example; spans = [(s0, s1, r1)], related span [s0, r1], gold text 'gold i'."""
    return {"video": f"{qid}.mp4", "question_id": qid, "duration": duration,
            "conversation": [{"role": "user", "content": question, "time": 0}],
            "answer": [{"role": "assistant", "content": f"gold {i}", "related_timespan": [s0, r1],
                        "reply_timespan": [s0, s1]} for i, (s0, s1, r1) in enumerate(spans)]}


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions. `answer(user_text)` returns the answer text, an int
    (an HTTP error status), ('sleep', s) (answer after s seconds) or ('raw', content_type, body)
    (an HTTP 200 with exactly that body, e.g. a proxy's HTML page). With `echo_auth` the answers and
    error messages repeat the request's Authorization header, as some proxies do."""

    def __init__(self):
        self.requests = []
        self.answer = lambda text: "3"
        self.echo_auth = False
        self.release = threading.Event()  # set at teardown: a slow answer stops waiting
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                out = fake.answer(body["messages"][-1]["content"])
                if isinstance(out, tuple) and out[0] == "sleep":  # a slow server: answer after the client gave up
                    fake.release.wait(out[1])
                    out = "3"
                echo = f" (Authorization: {self.headers['Authorization']})" if fake.echo_auth else ""
                status, content_type = 200, "application/json"
                if isinstance(out, tuple) and out[0] == "raw":
                    _, content_type, data = out
                elif isinstance(out, int):
                    data = json.dumps({"error": {"message": "boom" + echo, "type": "server_error"}}).encode()
                    status = out
                else:
                    data = json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": out + echo}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and closed the connection

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "JUDGE_MODEL", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeServer()
    yield fake
    fake.release.set()
    fake.httpd.shutdown()
    fake.httpd.server_close()
