"""Live sources: a camera, a network stream or a file played as one, read as the stream plays (paper: files only).

`live_frames` samples a PyAV source by presentation time, as mmduet2.read_frames samples a file (a frame every
`interval` s of stream time, upright); `Feed` hands the model the newest frames of each turn on the stream's clock
and drops those a slow model has no time for; `read_questions` turns typed lines into user texts; `Page` shows the
stream in a browser (`--serve`). infer.py watches with them (`python infer.py SOURCE`); how they behave:
docs/streaming.md, "Live sources", and docs/live.md.
Paper: Sec. 4.1's turns, on a clock (its evaluation feeds files whole).
    python -m pytest tests/test_infer.py -q -k "live or stream or page or question"
"""
import collections
import io
import json
import queue
import threading
import time

import numpy as np

from mmduet2 import clock

LIVE_TIMEOUT = 10  # seconds a live source may stay silent (opening it, or between packets) before it counts as broken


def is_live(source, input_format=None):
    """A camera or a network stream, read with PyAV as it plays (a video file is read with decord)."""
    return input_format is not None or "://" in source or source.startswith("/dev/video")


def live_frames(source, interval, input_format=None):
    """Yield (t, frame) from a camera or a network stream as it plays, one frame every `interval` s of
    stream time: for t = k·interval, the frame nearest t by the presentation times, counted from the
    stream's first frame (ties: the later), as read_frames picks a file's, so a file served as a stream
    gives the file's frames; a variable frame rate (a phone's) is read right. Choosing between the frames
    on either side of t means a frame is handed over when the next one arrives. `frame` is (H, W, 3)
    uint8 RGB at the source's size, turned upright by its display matrix (a phone's portrait video is
    stored sideways; decord turns a file's for read_frames). A gap in the stream skips the sample times
    it covers but the latest. A stream's end is not known ahead, so its last sample may be one that a
    file's frame count leaves out (its turn would end past the video).

    A source that cannot be opened is a one-line ValueError; one that breaks off part-way (a dropped
    connection, LIVE_TIMEOUT s without data) a one-line ConnectionError, after the frames before it.
        a 25 fps stream, interval 1 -> its frames at 0.0, 1.0, 2.0, ... s (every 25th)
    """
    import av  # imported here: PyAV is only needed for live sources
    fmt = input_format or ("v4l2" if source.startswith("/dev/video") else None)  # FFmpeg does not guess a camera
    try:
        container = av.open(source, format=fmt, timeout=LIVE_TIMEOUT)
    except (av.FFmpegError, OSError, ValueError) as e:  # refused, not found, not a video, an unknown format
        raise ValueError(f"cannot open {source}: {getattr(e, 'strerror', None) or e}") from None
    with container:  # closed when the stream ends, breaks, or the reader stops (Ctrl-C)
        if not container.streams.video:
            raise ValueError(f"{source} holds no video stream")
        # first: the stream's clock at its first frame; k: the next sample index; t: stream time;
        # before: (time, frame) of the frame before this one
        first, k, t, before = None, 0, 0.0, None
        try:
            for frame in container.decode(container.streams.video[0]):  # frames as they arrive
                if frame.time is None:  # frame.time: its presentation time in seconds (pts × time base)
                    continue  # none: it has no place on the stream's clock
                first = frame.time if first is None else first  # a network stream's clock rarely starts at 0
                t = frame.time - first
                n = int(t / interval + 1e-6)  # the last sample time this frame has reached (epsilon: float error)
                if n >= k:  # the first frame at or past a new sample time n·interval; after a gap, the latest
                    s = n * interval
                    # the frame before it lies before s: it is the one taken when it is nearer
                    nearest = before[1] if before and s - before[0] < t - s else frame
                    yield s, upright(nearest)
                    k = n + 1
                before = (t, frame)
        except (av.FFmpegError, OSError, ValueError) as e:  # a cut connection ends in a truncated packet
            raise ConnectionError(f"{source} broke off after {t:.1f} s of stream "
                                  f"({getattr(e, 'strerror', None) or e})") from None


def upright(frame):
    """A PyAV frame as (H, W, 3) uint8 RGB, turned as its display matrix says (a phone's portrait video is
    stored landscape, with "rotate 90" beside it). frame.rotation is counter-clockwise degrees, as np.rot90's k."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) as stored
    return np.ascontiguousarray(np.rot90(rgb, round(frame.rotation / 90) % 4))


def check_live(source, interval, input_format=None):
    """Fail early (before the model loads) on a live source that cannot be opened: its first frame."""
    frames = live_frames(source, interval, input_format)
    try:
        return next(frames)[1]
    except StopIteration:
        raise ValueError(f"{source} gave no frame") from None
    finally:
        frames.close()  # let go of the camera or the connection: the stream reopens it when the model is ready


class Feed:
    """A source's frames as they play, for a model that may be slower than the stream (live, or --realtime).

    A reader thread takes the (t, frame) samples (live_frames, or a file's read_frames) on the stream's
    clock, which starts when the first frame arrives. It never reads ahead of that clock, so a file or
    a served file plays at wall-clock speed, and it hands frame k over when the clock reaches its turn
    time (k+1)·interval, as the file path times turns. Only the newest `frames_per_turn` frames wait for
    the model: when a turn takes longer than the interval, the older ones are dropped (and counted), so
    the model is never more than about one turn behind the stream, whatever its speed.
        1 s interval, 1 frame per turn, 2.6 s per turn: frames 0, 2, 5, 7, 10, ... taken, the others dropped
    """

    def __init__(self, frames, interval, frames_per_turn=1):
        self.frames, self.interval = frames, interval
        # [(t, frame)] handed over, oldest first. Its maxlen is where frames are dropped: appending to a
        # full deque pushes its oldest frame out, so only the newest frames_per_turn wait for the model
        self.ready = collections.deque(maxlen=frames_per_turn)
        self.lock = threading.Condition()  # guards ready and done; wakes the model side
        self.start = None  # time.monotonic() at stream time 0
        self.done, self.error = False, None
        self.stop = threading.Event()  # the model side is finished (Ctrl-C, an error): the reader stops too
        self.taken = self.dropped = 0
        self.lags = []  # per turn: seconds from its turn time to its reply (stream_video fills it)

    def now(self):
        """Stream time: seconds since the first frame arrived."""
        return 0.0 if self.start is None else time.monotonic() - self.start

    def _wait_for(self, t):  # until stream time t, or the stop
        # a sleep that the model side can cut short: stop.set() wakes it at once
        self.stop.wait(max(0.0, self.start + t - time.monotonic()))

    def _hand_over(self, sample):
        with self.lock:
            self.dropped += len(self.ready) == self.ready.maxlen  # the model is busy: its oldest waiting frame goes
            self.ready.append(sample)
            self.lock.notify()

    def _read(self):
        held = None  # the newest frame, handed over when the stream reaches its turn time
        try:
            for t, frame in self.frames:  # live: each next() blocks until the source sends the frame
                if self.stop.is_set():
                    return
                if self.start is None:  # the first frame starts the clock: stream time t is now
                    self.start = time.monotonic() - t
                self._wait_for(t)  # a live frame arrives about now; a file's is read at once and waits
                if held:
                    self._hand_over(held)  # frame k+1 is at (k+1)·interval: frame k's turn time has come
                held = (t, frame)
        except Exception as e:  # a broken stream, a damaged file: raised on the model's side, after what came before
            self.error = e
        finally:
            if held and not self.stop.is_set():  # the last frame (or the last before a break) gets its turn too
                self._wait_for(held[0] + self.interval)
                self._hand_over(held)
            with self.lock:
                self.done = True
                self.lock.notify()

    def turns(self):
        """Yield (t, frames) each time the model is free: the newest frames handed over (waiting for them
        when the model is ahead), t = the last one's turn time. Ends with the stream, then raises its error."""
        threading.Thread(target=self._read, daemon=True).start()  # daemon: a hung source never blocks the exit
        try:
            while True:
                with self.lock:
                    # a whole turn's frames, or the end of the stream (then what is left, maybe nothing)
                    self.lock.wait_for(lambda: len(self.ready) == self.ready.maxlen or self.done)
                    turn = list(self.ready)  # frames_per_turn frames, fewer only at the end
                    self.ready.clear()
                if not turn:
                    break
                # the turn's time: one interval after its newest frame, as a file's turn (video_turns)
                yield turn[-1][0] + self.interval, [frame for _, frame in turn]
                self.taken += len(turn)  # once answered (a turn cut short by Ctrl-C is not)
        finally:
            self.stop.set()  # the reader thread ends too, also when the model side stops early
        if self.error:
            raise self.error

    def report(self):
        """Frames taken and dropped, and how far behind the stream the replies came."""
        slow = " (the model was slower than the stream)" if self.dropped else ""
        lag = f"mean {sum(self.lags) / len(self.lags):.1f} s, max {max(self.lags):.1f} s" if self.lags else "n/a"
        return f"frames: {self.taken} taken, {self.dropped} dropped{slow}; reply lag behind the stream: {lag}"


def read_questions(lines, questions):
    """Put each line typed on stdin into `questions` as it comes (a thread, while the stream plays)."""
    try:
        for line in lines:
            if line.strip():
                questions.put(line.strip())
    except (OSError, ValueError):  # stdin closed or not readable (a background run): no questions then
        pass


# ----------------------------------------------------------------------------
# The page (infer.py --serve HOST:PORT): watch a stream from a browser, with the standard library alone

MAX_QUESTION_BYTES = 4096  # a POST /question body longer than this is refused (413)
KEEP_EVENTS = 500  # turns a browser that opens the page late is sent first (the newest)


class Page:
    """A page to watch a stream from: the frame the model last saw, its replies with their stream times (silent
    turns too, as such), a box to type a question, and the stream's end (docs/live.md). Standard library only
    (http.server), one self-contained HTML page: nothing is fetched from another host.

        GET /            the page
        GET /frame.jpg   the frame the model last saw (404 before the first turn)
        GET /events      Server-Sent Events: one JSON object per turn, {"turn", "time", "clock", "text",
                         "silent", "question"}, its id the turn; the last KEEP_EVENTS first (after Last-Event-ID
                         when a page reconnects); then "end" with {"reason"}
        POST /question   the body (UTF-8 text) joins the next turn fed, through the queue stdin fills: 202
    A bad request is answered (400, 404, 405, 409 after the end, 411, 413) and never reaches the stream.
    The socket is opened when the Page is made (a port in use fails before the model loads); `start` serves it.
    """

    def __init__(self, host, port):
        from http.server import ThreadingHTTPServer
        self.questions = queue.Queue()  # what the page asks; infer.py's stdin reader puts typed lines here too
        self.events = collections.deque(maxlen=KEEP_EVENTS)  # (index, JSON text), oldest first
        self.count = 0  # events published so far: the next one's index
        self.frame = None  # the last frame (H, W, 3) and its turn; encoded to JPEG when asked for
        self.jpeg = (None, b"")  # (turn, bytes): the last encoded frame
        self.ended = None  # the end's reason, once the stream has ended
        self.readers = 0  # /events streams still open
        self.lock = threading.Condition()  # guards all of the above; wakes the /events streams
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def publish(self, t, frames, text, reply):
        """One turn, as infer.stream_video's on_turn gives it."""
        with self.lock:
            self.count += 1
            event = {"turn": self.count, "time": round(t, 6), "clock": clock(t), "text": reply.text.strip(),
                     "silent": reply.silent, "question": text}
            self.events.append((self.count, json.dumps(event)))
            if len(frames):
                self.frame = (self.count, frames[-1])
            self.lock.notify_all()

    def end(self, reason, linger=2.0):
        """Say the stream has ended, give the open pages up to `linger` s to read it, and stop serving."""
        with self.lock:
            self.ended = reason
            self.lock.notify_all()
        deadline = time.monotonic() + linger
        while self.readers and time.monotonic() < deadline:
            time.sleep(0.05)
        self.httpd.shutdown()
        self.httpd.server_close()

    def jpeg_frame(self):
        """The last frame as JPEG bytes, encoded once per turn (Pillow, a dependency of the processor)."""
        from PIL import Image
        with self.lock:
            frame, jpeg = self.frame, self.jpeg
        if frame is None:
            return None
        if jpeg[0] != frame[0]:  # two requests may both encode it: the same bytes
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame[1])).save(buf, "JPEG", quality=85)
            jpeg = (frame[0], buf.getvalue())
            with self.lock:
                if self.jpeg[0] is None or self.jpeg[0] < jpeg[0]:  # never an older frame over a newer one
                    self.jpeg = jpeg
        return jpeg[1]


def _handler(page):
    """The request handler of `page`: a class, as http.server wants."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # an idle connection does not hold its thread for ever

        def log_message(self, *args):  # the terminal stays as it is: replies only
            pass

        def handle(self):
            try:
                super().handle()
            except ConnectionError:  # a page closed mid-answer (a reload, a frame load cancelled): not ours to print
                pass

        def reply(self, status, body, content_type="text/plain; charset=utf-8"):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/":
                self.reply(200, PAGE_HTML, "text/html; charset=utf-8")
            elif path == "/frame.jpg":
                jpeg = page.jpeg_frame()
                self.reply(200, jpeg, "image/jpeg") if jpeg else self.reply(404, "no frame yet\n")
            elif path == "/events":
                self.events()
            else:
                self.reply(404, f"no such page: {path} (the page is /)\n")

        def events(self):
            """Server-Sent Events: the kept turns, then each new one as it comes, then the end."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            # the index of the last event written: an EventSource that reconnects says which it had (its id)
            last = self.headers.get("Last-Event-ID", "")
            sent = int(last) if last.isdigit() else 0
            with page.lock:
                page.readers += 1
            try:
                while True:
                    with page.lock:
                        # a new turn, the end, or 15 s (then a comment line: a closed page shows up as a write error)
                        page.lock.wait_for(lambda: page.count > sent or page.ended is not None, timeout=15)
                        new = [(i, e) for i, e in page.events if i > sent]
                        ended = page.ended
                    out = "".join(f"id: {i}\ndata: {e}\n\n" for i, e in new) or ": still watching\n\n"
                    sent = new[-1][0] if new else sent
                    if ended is not None and not new:
                        out = f"event: end\ndata: {json.dumps({'reason': ended})}\n\n"
                    self.wfile.write(out.encode())
                    self.wfile.flush()
                    if ended is not None and not new:
                        return
            except OSError:  # the page was closed
                pass
            finally:
                with page.lock:
                    page.readers -= 1

        def do_POST(self):
            if self.path.split("?")[0] != "/question":
                return self.reply(404 if self.path != "/" else 405, "POST /question with the question as its body\n")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self.reply(411, "a question needs its Content-Length\n")
            if int(length) > MAX_QUESTION_BYTES:
                self.close_connection = True  # its body is not read: the connection cannot be reused
                return self.reply(413, f"a question is at most {MAX_QUESTION_BYTES} bytes\n")
            try:
                text = self.rfile.read(int(length)).decode("utf-8").strip()
            except UnicodeDecodeError:
                return self.reply(400, "a question is UTF-8 text\n")
            if not text:
                return self.reply(400, "the question is empty\n")
            if page.ended is not None:
                return self.reply(409, "the stream has ended\n")
            page.questions.put(text)  # joins the turn fed next, as a line typed on stdin
            self.reply(202, json.dumps({"queued": text}), "application/json")

        do_PUT = do_DELETE = do_PATCH = lambda self: self.reply(405, "GET / or /events, POST /question\n")

    return Handler


PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MMDuet2, watching</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 0; display: flex; gap: 16px; padding: 16px; background: #fafafa; }
 #left { flex: 0 0 auto; max-width: 48%; } #right { flex: 1 1 auto; min-width: 0; }
 #frame { max-width: 100%; border: 1px solid #ccc; background: #222; min-width: 224px; min-height: 112px; display: block; }
 #status { margin: 8px 0; color: #555; } #status.ended { color: #a40; font-weight: bold; }
 form { display: flex; gap: 8px; margin: 8px 0 16px; } #q { flex: 1; padding: 6px; font: inherit; }
 #log { list-style: none; padding: 0; margin: 0; max-height: 80vh; overflow-y: auto; }
 #log li { padding: 3px 6px; border-bottom: 1px solid #eee; } .t { color: #888; font-family: monospace; margin-right: 8px; }
 li.silent { color: #aaa; font-size: 12px; padding: 0 6px; } li.question { background: #eef4ff; } li.reply { background: #fff; }
</style></head><body>
<div id="left"><img id="frame" alt="the frame the model last saw">
 <div id="status">waiting for the first turn...</div></div>
<div id="right">
 <form id="ask"><input id="q" placeholder="Ask a question: it joins the next turn" autocomplete="off" maxlength="2000">
  <button>Ask</button></form>
 <ul id="log"></ul></div>
<script>
const log = document.getElementById("log"), status = document.getElementById("status");
const frame = document.getElementById("frame");
function line(cls, clock, text) {  // textContent only: a reply or a question is never read as HTML
  const li = document.createElement("li"), t = document.createElement("span");
  li.className = cls; t.className = "t"; t.textContent = "[" + clock + "]";
  li.append(t, document.createTextNode(text)); log.prepend(li);
  while (log.children.length > 400) log.lastChild.remove();
}
const events = new EventSource("/events");
events.onmessage = (m) => {
  const e = JSON.parse(m.data);
  if (e.question) line("question", e.clock, "> " + e.question);
  line(e.silent ? "silent" : "reply", e.clock, e.silent ? "(silent)" : e.text);
  frame.src = "/frame.jpg?turn=" + e.turn;
  status.textContent = "turn " + e.turn + " at " + e.clock + " of the stream";
};
events.addEventListener("end", (m) => {
  events.close(); status.className = "ended";
  status.textContent = "The stream has ended: " + JSON.parse(m.data).reason;
});
events.onerror = () => { if (status.className !== "ended") status.textContent = "lost the connection to infer.py; retrying..."; };
document.getElementById("ask").onsubmit = async (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q"), text = q.value.trim();
  if (!text) return;
  const r = await fetch("/question", {method: "POST", body: text}).catch(() => null);
  if (r && r.status === 202) { q.value = ""; status.textContent = "asked: it joins the next turn"; }
  else status.textContent = "not asked: " + (r ? await r.text() : "infer.py is not there");
};
</script></body></html>
"""
