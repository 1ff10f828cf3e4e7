"""MMDuet2's hub: the chat template, frames, token ids, model loading and the streaming engine.

Role in the pipeline: every script imports this file, and it imports none of them.

    data.py ──▶ sft.py ──▶ grpo.py ──▶ infer.py          (reward.py stands alone)
          \\________ all of them use mmduet2.py ________/

What lives here, top to bottom (paper Sec. 4.1 and Appendix A; what we take from the paper is
collected in docs/paper.md):

1. Constants: the proactive system prompt of the paper's Fig. 2, the silence string, the special tokens.
2. Frames: sample a video at a fixed interval with decord, one frame at a time; the time of each
   user turn; the size of a frame, through qwen-vl-utils (Qwen's own rule; 128 LLM tokens per
   frame by default).
3. Dialogue files: our SFT JSONL and the released MMDuet2 SFT JSONL (docs/formats.md; the
   benchmark's anno.json is read by reward.py).
4. Token ids in, token ids out: a conversation is encoded message by message as *deltas* through
   the checkpoint's own chat template (ids, modality types, pixels, image grids, loss mask), and
   positioned with Qwen2.5-VL's 3-D rope, chunk by chunk.
5. Models: `from_pretrained` on the hub or a folder, or `tiny`: a random Qwen2.5-VL with a
   tokenizer trained in-process, for tests, the toy world and smoke runs.
6. The streaming engine (docs/streaming.md): `Stream` keeps a proactive chat in a KV cache. Feed a
   user turn, get the assistant turn back (a reply or NO REPLY) with its exact token ids. Our code
   is the prefill (new frames and text, explicit 3-D positions); decoding goes through transformers'
   `generate` with a `GenerationConfig`. Read the plain path (`Stream.turn`) first; the two
   optimisations come after it, each marked: fast silence (the NO REPLY draft checked in the same
   forward as the user turn) and `Group` (G streams decoded as one batch: GRPO's rollouts).
7. Runs: the --toy preset, and the one checkpoint format and resume path of sft.py and grpo.py.

Departures: fast silence and `Group` are ours (neither the paper nor the released code has them);
they change the cost only (greedy: the same ids; sampled: the same distribution), and tests hold
both to the plain path. FRAME_TOKENS caps frames at inference too, where the released code set no
cap (infer.py says so with its other departures).

Try it:

    python -c "import mmduet2; m, p = mmduet2.load_model('tiny'); print(m.num_parameters())"
    python infer.py video.mp4 --model tiny          # the engine on a real file
"""
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch


def _check_transformers(needed="5.23"):
    """Stop with one line when the installed transformers is older than `needed`.

    An older one runs wrong without an error: 5.17 takes `mm_encoder_outputs` (our cached vision features)
    into **kwargs, so cached turns go without their frames. Checked here, at import, rather than in
    load_model: every script and every path (the 3B architecture built by bench.py, the tests) passes
    through the import, before any data or model work, and the message is the same wherever it fires.
    The version is read from the package's metadata: importing transformers would cost ~2 s here.
    """
    from importlib.metadata import PackageNotFoundError, version
    from packaging.version import Version  # a dependency of transformers, so present wherever it is
    try:
        found = version("transformers")
    except PackageNotFoundError:
        found = None
    if found is None or Version(found) < Version(needed):  # a dev build of 5.23 is older than 5.23
        have = f"transformers {found} is installed" if found else "transformers is not installed"
        raise SystemExit(f"mmduet2.py: {have}; this code needs transformers >= {needed} (pip install -r requirements.txt)")


_check_transformers()

# ----------------------------------------------------------------------------
# 1. Constants

# The paper's Fig. 2 system prompt, one space-joined line. The released checkpoint was trained on
# exactly this text: changing a character changes what the model sees.
SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to answer questions based on continuously incoming "
    "video frames. Your responses should include information from the video since your last reply "
    '(if any). If the information in this segment of the video cannot answer the question, output "NO REPLY".'
)
# Offline (non-proactive) examples keep Qwen's default prompt (Sec. 4.1: the system prompt tells the
# two kinds of task apart, which limits forgetting of offline skills).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SILENCE = "NO REPLY"   # a turn is silent when its stripped text equals this
IMAGE = "<image>"      # one frame in a message's text (the released data's placeholder)

# Qwen2.5-VL's special tokens, by name: ids are always looked up in the tokenizer, never written down.
# <|im_end|> closes every turn; generation stops on it.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD, ENDOFTEXT = "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

DEFAULT_MODEL = "wangyueqian/MMDuet2"
FRAME_TOKENS = 128      # LLM tokens per frame (paper: max_pixels = 128·28·28 in training)
PIXELS_PER_TOKEN = 28 * 28  # one LLM token = a 2×2 merge of 14×14 patches

# Qwen2.5-VL's chat format, written as a Jinja template for the tiny tokenizer (a released checkpoint
# ships its own). Each message renders as `<|im_start|>role\n...<|im_end|>\n`, images as
# `<|vision_start|><|image_pad|><|vision_end|>`; a conversation without a system turn gets the default.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_silent(text):
    """A turn is silent when its text, stripped, is exactly NO REPLY (the paper's rule)."""
    return text.strip() == SILENCE


# ----------------------------------------------------------------------------
# 2. Frames

def _open_video(path):
    """decord VideoReader with a one-line error for a missing, corrupt or empty file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a video file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    import decord  # imported here: decord is only needed when a real video is read
    # FFmpeg's own log lines ("[h264 @ 0x...] Invalid NAL unit size") would bury our one-line
    # errors; a frame that fails to decode still raises, and read_frames says which one
    decord.logging.set_level(decord.logging.QUIET)
    try:
        with _quiet_stderr():  # decord's C++ logger prints "video_reader.cc:83: ERROR opening" past QUIET
            vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError (or a RuntimeError) for anything unreadable
        why = "it holds no video stream" if "cannot find video stream" in str(e) else _decord_reason(e)
        raise ValueError(f"cannot decode video {path}: {why}") from None
    if len(vr) == 0 or vr.get_avg_fps() <= 0:
        raise ValueError(f"video has no frames: {path}")
    return vr


@contextlib.contextmanager
def _quiet_stderr():
    """Send what C++ code writes to stderr (file descriptor 2, which Python's sys.stderr cannot catch) to
    /dev/null for the duration of the block; Python's own stderr output there is lost too, so keep it short."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


def _decord_reason(error):
    """decord's message without its C++ source locations and check expressions, capped at 200 characters:
        "[16:18:12] src/threaded_decoder.cc:218: Check failed: send(pkt) >= 0 (-1 vs. 0) Error sending packet."
        -> "Error sending packet"
    """
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", line)           # "[time] file.cc:line: ", nested once per thread
    line = re.sub(r"Check failed: .*? \(.*? vs\. .*?\) ", "", line)  # the failed C++ assertion itself
    return line[:200].rstrip(".")  # our messages go on after it


def count_frames(duration, interval):
    """Frames a video of `duration` seconds gives at one frame every `interval` seconds: int(D / interval).

    The one place this rule lives (read_frames samples it, data.py builds dialogues on it, infer.py
    checks --ask times against it). A trailing piece shorter than one interval gives no frame, so
    every frame's turn time ((k+1)·interval) lies inside the video.
        10.5 s, 2 s → 5      0.3 s, 0.1 s → 3 (0.3 / 0.1 = 2.9999999999999996 in floats)
    """
    return int(duration / interval + 1e-6)  # the epsilon absorbs float error on exact multiples


def _clock(vr):
    """An opened video's clock, from its frames' presentation times: (duration in s, frame_at), where
    frame_at(t) is the index of the frame nearest t seconds after the first frame (ties: the later one).

    Phones record at a variable frame rate (30 fps, then 2 fps when the scene is dark or still): there a
    frame's index over the average fps is not its time, and the average fps does not give the length. A
    constant-rate video (every frame within a tenth of a frame of i / fps) keeps the closed form it always had,
    duration n / fps and frame round(t·fps): exactly the frames, ties and float rounding included, that it
    gave before timestamps were read (the toy world's results rest on them; a test holds it). Otherwise the
    last frame lasts as long as the gap before it: decord's end times assume one fixed frame duration, and
    the mp4 muxer's stream duration can be shorter than the frames it holds.
        30 fps for 10 s, then 2 fps to 20 s → duration 20.0, frame_at(17.0) = the frame shown at 17.0 s
    """
    n, fps = len(vr), vr.get_avg_fps()
    starts = vr.get_frame_timestamp(range(n))[:, 0].astype(np.float64)  # (n,) each frame's start, s
    starts -= starts[0]  # a stream's clock may start anywhere: count from its first frame
    even = np.abs(starts - np.arange(n) / fps).max() < 0.1 / fps
    # a stream without usable timestamps (all equal, or out of order) can only be read at its average rate
    if even or n < 2 or not (np.diff(starts) > 0).all():
        return n / fps, lambda t: min(round(t * fps), n - 1)  # the nearest frame; the clamp: past the last

    def frame_at(t):
        j = int(np.searchsorted(starts, t))  # starts[j - 1] < t <= starts[j]
        if j == n or (j > 0 and t - starts[j - 1] < starts[j] - t):
            return j - 1
        return j
    return float(2 * starts[-1] - starts[-2]), frame_at


def video_duration(path):
    """Length of a video in seconds, from its frames' presentation times (`_clock`)."""
    return _clock(_open_video(path))[0]


def _rgb(frame):
    """decord's frame as an (H, W, 3) uint8 array.

    decord hands out FFmpeg's buffer without a copy when a row's length in bytes (FFmpeg pads
    rows for alignment: the 24 bytes of an 8-pixel RGB row take 96) is a multiple of the width,
    and then reports that length / width as the channel count: an 8×8 frame comes back as
    (8, 8, 12), a 16×16 one as (16, 16, 6). Each row's first 3·W bytes are the pixels.
    """
    h, w, c = frame.shape
    if c == 3:
        return frame
    return np.ascontiguousarray(frame.reshape(h, w * c)[:, :3 * w].reshape(h, w, 3))  # (H, W, 3)


def read_frames(path, interval):
    """Yield `(t, frame)` for frame k = 0, 1, ... sampled at video time t = k·interval.

    `frame` is an (H, W, 3) uint8 RGB array, upright (decord applies a phone's rotation), the video's
    frame nearest time t by the presentation times (`_clock`: a variable frame rate is read right). A
    video of duration D gives count_frames(D, interval) frames, so every frame's turn time
    ((k+1)·interval, see `turn_times`) lies inside the video. Frames are decoded one at a time, so an
    hour-long video never sits in memory; a frame that fails to decode (a damaged file whose start is
    fine) is a one-line ValueError saying where.
        10.5 s video, interval 2 → frames at t = 0, 2, 4, 6, 8 (5 frames)
    """
    if not 0 < interval < float("inf"):  # also refuses nan, which every comparison fails
        raise ValueError(f"frame interval must be > 0 s and finite, got {interval}")
    vr = _open_video(path)
    duration, frame_at = _clock(vr)
    n = count_frames(duration, interval)
    if n == 0:
        raise ValueError(f"video {path} ({duration:.2f} s) is shorter than one frame interval ({interval} s)")
    period = duration / len(vr)  # the mean time between frames
    # far below the frame period, every frame would be fed many times over (at 0.001 s: 100 turns per
    # frame of a 10 fps video), for minutes, without a word
    if interval < period / 2:
        raise ValueError(f"frame interval {interval:g} s is far below the frame period of {path} ({period:.3g} s): "
                         f"each frame would be fed {period / interval:.0f} times; use an interval >= {period:.3g} s")
    for k in range(n):
        try:
            frame = vr[frame_at(k * interval)].asnumpy()
        except Exception as e:  # decord's DECORDError: damaged bytes after a readable start
            # decord decodes ahead on a thread, so the damage may lie a few frames past this one
            raise ValueError(f"cannot decode video {path} (reading its frame at {k * interval:g} s): "
                             f"{_decord_reason(e)}") from None
        yield k * interval, _rgb(frame)


def turn_times(n_frames, interval, frames_per_turn):
    """Time of each user turn: frames fed so far × interval (the paper's end-of-turn convention).

    Turn j holds frames [j·fpt, (j+1)·fpt); the last turn may hold fewer.
        5 frames, 2 s, 2 per turn → [4.0, 8.0, 10.0]      3 frames, 1 s, 1 per turn → [1.0, 2.0, 3.0]
    """
    if frames_per_turn not in (1, 2):
        raise ValueError(f"frames per turn must be 1 or 2, got {frames_per_turn}")
    # turn j starts at frame j (a multiple of fpt) and ends after fpt frames, or the last frame
    return [min(j + frames_per_turn, n_frames) * interval for j in range(0, n_frames, frames_per_turn)]


def turn_text(texts):
    """A user turn's text from the texts that arrived for it (a question, subtitles), in order: one per line."""
    return "\n".join(texts) or None


def reply_turn(times, span):
    """Index of the turn where SFT places a gold reply: the paper's rule, at the END of its span.

    The last turn whose time lies in [s0, s1] (the event has happened by then, so the reply is not
    a guess, Sec. 4.2); if no turn falls inside a short span, the first turn after s0; None if the
    video ends first.
        times [2, 4, 6, 8], span [3, 7] → 2 (t=6)      span [4.5, 5] → 2 (t=6)
    """
    s0, s1 = span
    # a turn's time is the end of its frames, so a turn inside the span has seen part of the event
    inside = [j for j, t in enumerate(times) if s0 <= t <= s1]
    if inside:
        return inside[-1]
    after = [j for j, t in enumerate(times) if t >= s0]
    return after[0] if after else None


def frame_pixels(max_tokens=FRAME_TOKENS):
    """(min, max) pixels of a frame: at least 4 LLM tokens, at most max_tokens (the paper: 128·28·28)."""
    return 4 * PIXELS_PER_TOKEN, max_tokens * PIXELS_PER_TOKEN


def frame_tokens(height, width, max_tokens=FRAME_TOKENS):
    """LLM tokens one (height × width) frame costs after `fit_frame`: a 16:9 frame 120, 448×224 128, 84×84 9."""
    from qwen_vl_utils import smart_resize  # Qwen's own frame-size rule
    # sides rounded to multiples of 28 px (one LLM token), the area scaled into [min, max] pixels
    h, w = smart_resize(height, width, 28, *frame_pixels(max_tokens))
    return h * w // PIXELS_PER_TOKEN


def fit_frame(frame, processor):
    """A frame resized as Qwen's own pipeline sizes images (qwen-vl-utils): both sides multiples of 28 px (one
    LLM token = a 2×2 merge of 14-px patches), the area within the processor's limits (`set_frame_tokens`),
    the aspect ratio kept. (H, W, 3) uint8 → (H', W', 3) uint8; a frame that already fits is returned as is."""
    from PIL import Image
    from qwen_vl_utils import fetch_image
    # Qwen's image processor keeps min and max pixels under these two names (set_frame_tokens sets them)
    size = processor.image_processor.size
    image = fetch_image({"image": Image.fromarray(frame), "min_pixels": size["shortest_edge"],
                         "max_pixels": size["longest_edge"]})
    return np.array(image)  # a writable copy (the processor makes a tensor of it)


def set_frame_tokens(processor, max_tokens=FRAME_TOKENS):
    """Frames get at most max_tokens LLM tokens: `fit_frame` reads this, and the processor, given fitted frames,
    leaves them as they are."""
    processor.image_processor.size = dict(zip(("shortest_edge", "longest_edge"), frame_pixels(max_tokens)))


# ----------------------------------------------------------------------------
# 3. Dialogue files
#
# A dialogue is a list of messages {"role", "content", "time"?} whose text holds one "<image>" per
# frame, plus the frames in order. Our SFT JSONL (written by data.py) names a video and an interval;
# the released MMDuet2 JSONL names one image file per placeholder instead. Both load to the same thing.

def read_jsonl(path):
    """Yield (line_number, record) from a JSONL file; a malformed line is a one-line ValueError."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give the JSONL file(s) in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named below, with its file and line
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line.decode())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
                except UnicodeDecodeError:  # e.g. UTF-16, as some Windows editors save
                    raise ValueError(f"{path}:{i}: not UTF-8 text (saved as UTF-16?): save it as UTF-8") from None


def _load_image(spec, root):
    """One frame of the released data, relative to `root`: a JPG/PNG path, or `file.hdf5:::index` (the web part of
    MMDuet2-data). An HDF5 file with one dataset holds the frames in order (encoded JPEG bytes, or (H, W, 3)
    arrays); one with several datasets names them by index. A missing file or index is a one-line error."""
    from PIL import Image
    file, hdf5, index = spec.partition(":::")
    path = os.path.join(root, file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frame file not found: {path}")
    if not hdf5:
        return np.asarray(Image.open(path).convert("RGB"))
    import h5py  # pinned in requirements.txt; only the released web frames need it
    with h5py.File(path, "r") as h:
        keys = list(h)
        try:
            data = h[keys[0]][int(index)] if len(keys) == 1 else h[index][()]
        except (ValueError, IndexError, KeyError):
            n = len(h[keys[0]]) if len(keys) == 1 else len(keys)
            raise ValueError(f"{spec}: no frame {index!r} in {path} (it holds {n})") from None
    if data.ndim == 1:  # encoded JPEG bytes
        return np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
    return np.asarray(data)


def load_dialogue(record, root="."):
    """Turn one SFT JSONL record (ours or the released format) into (messages, frames).

    Paths are relative to `root` (the JSONL's folder). Only as many video frames are read as the
    messages have "<image>" placeholders, so a truncated dialogue costs only its own frames.
    """
    messages = record["messages"]
    n_images = sum(m["content"].count(IMAGE) for m in messages)
    if "images" in record:  # released format: one file per placeholder
        specs = [im["path"] if isinstance(im, dict) else im for im in record["images"]]
        if len(specs) != n_images:
            raise ValueError(f"{len(specs)} images for {n_images} {IMAGE} placeholders")
        frames = [_load_image(s, root) for s in specs]
    else:  # ours: frames sampled from the video at the dialogue's interval
        frames = []
        for _, frame in read_frames(os.path.join(root, record["video"]), record["interval"]):
            if len(frames) == n_images:
                break
            frames.append(frame)
        if len(frames) < n_images:
            raise ValueError(f"{record['video']} has {len(frames)} frames, the dialogue needs {n_images}")
    return messages, frames


def check_dialogue(record, root=".", durations=None):
    """What `load_dialogue` would fail on, found without decoding a frame: a one-line ValueError.

    The messages are {role, content} texts; the released format has one existing file per "<image>"
    placeholder; ours names an existing video and a positive interval, and the video gives at least as
    many frames as the placeholders (its length is read, not its frames: `durations` caches it by path).
    So bad data stops before the model loads, not when training reaches it. Not checked: an HDF5 index
    (the file is opened only when its frames are read).
    """
    messages = record.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError("'messages' must be a non-empty list of {role, content} texts")
    n_images = sum(m["content"].count(IMAGE) for m in messages)
    if "images" in record:
        specs = [im["path"] if isinstance(im, dict) else im for im in record["images"]]
        if len(specs) != n_images:
            raise ValueError(f"{len(specs)} images for {n_images} {IMAGE} placeholders")
        for spec in specs:
            path = os.path.join(root, str(spec).partition(":::")[0])
            if not os.path.isfile(path):
                raise ValueError(f"frame file not found: {path}")
        return
    interval = record.get("interval")
    if not (isinstance(interval, (int, float)) and 0 < interval < float("inf")):
        raise ValueError(f"'interval' must be a number of seconds > 0, got {interval!r}")
    path = os.path.join(root, str(record.get("video")))
    durations = {} if durations is None else durations
    if path not in durations:
        try:
            durations[path] = video_duration(path)
        except OSError as e:  # not found, or a folder: the same one line as a ValueError
            raise ValueError(str(e)) from None
    n = count_frames(durations[path], interval)
    if n < n_images:
        raise ValueError(f"{record.get('video')} gives {n} frames at a {interval:g} s interval, "
                         f"the dialogue has {n_images} {IMAGE} placeholders")


# ----------------------------------------------------------------------------
# 4. Token ids in, token ids out
#
# Everything the model sees is a Chunk: ids plus what travels with them (modality types, loss mask,
# pixels, grids). Chunks add up, so a conversation is the sum of its turns' chunks. SFT encodes a
# whole dialogue at once, the Stream one turn at a time; both give the same ids (a test checks it).

def to_chat(message):
    """Our message (text with "<image>" placeholders) → the processor's chat format: frames first."""
    parts = message["content"].split(IMAGE)
    # Sec. 4.1: a user turn is its frames, then its text, whatever the placeholders' places
    content = [{"type": "image"}] * (len(parts) - 1)
    text = "".join(parts)
    if text:
        content = content + [{"type": "text", "text": text}]
    return {"role": message["role"], "content": content}


@dataclass
class Chunk:
    """A piece of the token sequence, ready to be fed to the model (batch size 1)."""
    ids: list                 # token ids
    mm_types: list            # 0 text, 1 image token, per id (Qwen2.5-VL needs it for 3-D rope)
    mask: list                # 1 = a supervised/generated assistant token, 0 = context
    pixels: list = field(default_factory=list)  # per image: (patches, 1176) float tensor
    grids: list = field(default_factory=list)   # per image: (t, h, w) patch grid

    def head(self, n):
        """The first n tokens (n < 0: all but the last -n); only text may be cut off, so no pixels are dropped."""
        assert not any(self.mm_types[n:]), "Chunk.head cannot cut an image"
        return Chunk(self.ids[:n], self.mm_types[:n], self.mask[:n], self.pixels, self.grids)

    def __add__(self, other):
        return Chunk(self.ids + other.ids, self.mm_types + other.mm_types, self.mask + other.mask,
                     self.pixels + other.pixels, self.grids + other.grids)


def _image_tokens(grid):
    """LLM tokens of one image with patch grid (t, h, w): the 2×2 merge makes 4 patches one token."""
    return grid[0] * grid[1] * grid[2] // 4


def _tokenize(processor, text, images=()):
    """Text with one image marker per frame → a Chunk (image pads expanded to the frame's tokens)."""
    if not images:  # text only: the tokenizer alone (the processor's overhead doubled a turn's encode time)
        ids = processor.tokenizer(text)["input_ids"]
        return Chunk(ids, [0] * len(ids), [0] * len(ids))
    # the processor repeats each <|image_pad|> once per LLM token of its (already fitted) frame
    out = processor(text=[text], images=[fit_frame(f, processor) for f in images], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    grid = out["image_grid_thw"]  # (n_images, 3)
    # pixel_values comes as one (all patches, C·T·14·14) tensor: cut it back into one piece per image
    pixels = list(torch.split(out["pixel_values"], grid.prod(-1).tolist()))  # (patches_i, C·T·14·14) each
    grids = [tuple(g) for g in grid.tolist()]
    return Chunk(ids, out["mm_token_type_ids"][0].tolist(), [0] * len(ids), pixels, grids)


def _render(processor, messages, generation_prompt=False):
    return processor.apply_chat_template([to_chat(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _delta(processor, system, message, generation_prompt=False):
    """The text `message` adds to a conversation, through the checkpoint's own chat template.

    The delta does not depend on the turns before it, so a conversation encoded turn by turn equals
    the conversation encoded whole: a test checks this against rendering the whole conversation.
    """
    # render [system] and [system, message], keep the difference. The template renders each message on
    # its own (only a *missing* system turn is special, and we always give one), so this is the delta.
    before = _render(processor, [system])
    after = _render(processor, [system, message], generation_prompt)
    assert after.startswith(before), "chat template is not prefix-stable"
    return after[len(before):]


def encode_system(processor, system=SYSTEM_PROMPT):
    """The system turn as a Chunk (mask 0)."""
    return _tokenize(processor, _render(processor, [{"role": "system", "content": system}]))


def encode_user(processor, text, frames, system=SYSTEM_PROMPT, generation_prompt=True):
    """A user turn (frames first, then text) plus, by default, the `<|im_start|>assistant\\n` header."""
    sys_msg = {"role": "system", "content": system}
    # the header belongs to the user turn's chunk: the Stream prefills it with the frames, and the
    # reply is then generated from its last token
    return _tokenize(processor, _delta(processor, sys_msg, {"role": "user", "content": IMAGE * len(frames) + (text or "")},
                                       generation_prompt), frames)


def encode_assistant(processor, text, system=SYSTEM_PROMPT):
    """An assistant turn: header + text + <|im_end|> + "\\n". Mask = 1 on text and <|im_end|> (NO REPLY too)."""
    sys_msg = {"role": "system", "content": system}
    full = _delta(processor, sys_msg, {"role": "assistant", "content": text})
    # the header alone: what the template's generation prompt adds after a turn
    head = _delta(processor, sys_msg, {"role": "user", "content": ""}, True)
    head = head[head.index(IM_START + "assistant"):]  # "<|im_start|>assistant\n"
    assert full.startswith(head) and full.endswith(IM_END + "\n"), "unexpected chat template"
    # the loss mask: the header and the trailing "\n" are template, not a decision, so they are not
    # trained; the text and its <|im_end|> are (ending the turn is a decision). NO REPLY is trained
    # like any reply: silence is a decision too.
    body = _tokenize(processor, full[len(head):-1])  # text + <|im_end|>
    body.mask = [1] * len(body.ids)
    tail = _tokenize(processor, "\n")
    # three pieces for the three mask runs (0, 1, 0); they split where the tokenizer splits anyway (at special
    # tokens and line ends), so they give the ids of the whole (test_deltas_equal_whole_conversation)
    return _tokenize(processor, head) + body + tail


def encode_dialogue(processor, messages, frames, system=SYSTEM_PROMPT, max_tokens=None):
    """A whole dialogue → one Chunk with its loss mask (the SFT input).

    A system message in the data overrides `system` (offline examples carry Qwen's default).
    `max_tokens` truncates on the right (paper: 10,000), never inside an image.
    """
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    seq, k = encode_system(processor, system), 0  # k: the next unused frame
    for m in messages:
        if m["role"] == "assistant":
            turn = encode_assistant(processor, m["content"], system)
            if m.get("train") is False:  # history the model is not taught to say (data.py --history-frac)
                turn.mask = [0] * len(turn.ids)
            seq = seq + turn
        else:  # user turns are context (mask 0); their placeholders take the next n frames
            n = m["content"].count(IMAGE)
            text = m["content"].replace(IMAGE, "")
            seq = seq + encode_user(processor, text, frames[k:k + n], system, generation_prompt=False)
            k += n
        if max_tokens and len(seq.ids) >= max_tokens:
            break  # the rest would be cut anyway: do not encode (and resize) its frames
    if max_tokens and len(seq.ids) > max_tokens:
        seq = truncate(seq, max_tokens)
    return seq


def truncate(seq, n):
    """Keep the first n tokens; an image cut in half is dropped whole (its tokens and pixels)."""
    ids, types, mask = seq.ids[:n], seq.mm_types[:n], seq.mask[:n]
    n_img_tokens = sum(types)  # image tokens kept
    # keep the images whose tokens all lie among the first n; `used` counts their tokens
    pixels, grids, used = [], [], 0
    for p, g in zip(seq.pixels, seq.grids):
        t = _image_tokens(g)
        if used + t > n_img_tokens:
            break
        pixels.append(p), grids.append(g)
        used += t
    cut = len(ids)
    if used < n_img_tokens:  # drop the partial image's tokens from where it starts
        cut = [i for i, t in enumerate(types) if t][used]  # index of the first image token not kept
    return Chunk(ids[:cut], types[:cut], mask[:cut], pixels, grids)


def rope_positions(model, chunk, start=0):
    """3-D rope positions (3, 1, L) of a chunk whose first token follows position `start - 1`.

    Passed explicitly on every cached forward and to `generate` (docs/streaming.md, pitfalls 1 and 2).
    """
    ids = torch.tensor([chunk.ids])  # (1, L)
    types = torch.tensor([chunk.mm_types])  # (1, L): without it positions silently fall back to 1-D
    grids = torch.tensor(chunk.grids) if chunk.grids else None  # (n_images, 3)
    # Qwen2.5-VL gives text tokens equal (t, h, w) positions and image tokens a grid. The index is
    # offset-invariant, so a chunk's positions are its own index shifted to where the sequence is.
    # Left to itself, a cached forward would reuse `rope_deltas` state from an earlier call, stale
    # once a stream holds several images: no error, the logits just drift.
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grids)  # (3, 1, L)
    return pos + start


def model_inputs(model, chunk, start=0):
    """Keyword arguments for `model(...)` on a chunk: ids, pixels, grids and explicit positions."""
    dev = model.device
    kw = dict(input_ids=torch.tensor([chunk.ids], device=dev),  # (1, L)
              position_ids=rope_positions(model, chunk, start).to(dev))  # (3, 1, L)
    if chunk.pixels:
        kw["pixel_values"] = torch.cat(chunk.pixels).to(dev, model.dtype)  # (all patches, 1176)
        kw["image_grid_thw"] = torch.tensor(chunk.grids, device=dev)  # (n_images, 3)
    return kw


def token_logprobs(logits, ids, temperature=1.0):
    """log p(ids[i] | ...) from logits (L, V) for ids (L,), under softmax(logits / temperature)."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids[:, None])[:, 0]


def forward_logprobs(model, seq, temperature=1.0, wrapped=None):
    """One full forward over a Chunk: log p of every masked token (training; the golden reference).

    Returns a (n_masked,) tensor. `wrapped`: the accelerate/DDP-wrapped model to call, so that
    gradients synchronise across ranks (positions are still computed on the plain `model`).
    """
    mask = torch.tensor(seq.mask)
    targets = mask[1:].nonzero()[:, 0] + 1  # (n_masked,) indices of supervised tokens; position i-1 predicts i
    # logits only where a masked token is predicted: the lm_head over a long video dialogue would
    # otherwise be the largest tensor of the step
    out = (wrapped or model)(**model_inputs(model, seq), logits_to_keep=(targets - 1).to(model.device),
                             use_cache=False)
    ids = torch.tensor(seq.ids, device=model.device)[targets.to(model.device)]  # (n_masked,)
    return token_logprobs(out.logits[0], ids, temperature)  # out.logits: (1, n_masked, V)


# ----------------------------------------------------------------------------
# 5. Models

def load_model(name=DEFAULT_MODEL, dtype=None, device=None, attn=None, frame_tokens=FRAME_TOKENS):
    """(model, processor) from a hub name, a local folder, or "tiny" (built in-process, random).

    dtype: bf16 on GPU, fp32 on CPU unless given. attn: e.g. "sdpa", "flash_attention_2".
    A hub name is looked up in the local hub cache first, so a model downloaded once loads offline.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name == "tiny":
        model, processor = tiny_model()
        for p in model.parameters():  # the weights only, as from_pretrained(dtype=...) casts them (see below)
            p.data = p.data.to(dtype)
    elif os.path.isdir(os.path.expanduser(name)):
        _check_model_folder(os.path.expanduser(name))  # before anything is built
        try:
            model, processor = _from_pretrained(os.path.expanduser(name), dtype, attn)
        except OSError as e:
            raise OSError(f"cannot load model folder {name}: {str(e).splitlines()[0][:200]}") from None
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:  # a hub id is "org/name": a mistyped path
        raise FileNotFoundError(f"model folder not found: {name}")
    else:
        try:  # the cache only: no network, no waiting
            model, processor = _from_pretrained(name, dtype, attn, local_files_only=True)
        except OSError:  # not (all) cached: download it, after one quick request that fails fast without network
            _check_hub(name)
            try:
                model, processor = _from_pretrained(name, dtype, attn)
            except OSError as e:
                raise _hub_error(name, str(e).splitlines()[0][:160]) from None
    set_frame_tokens(processor, frame_tokens)  # the processor's own default would be far larger frames
    # the device only: a module-wide .to(dtype) would also round the buffers made in fp32 on purpose. Rope's
    # inverse frequencies in bf16 (0.4217 -> 0.4219) turn a stream's rotations wrong by radians past position
    # 10,000 (4-12 minutes of video), while the weights in bf16 lose nothing we use.
    return model.to(device).eval(), processor


def _check_model_folder(folder):
    """A FileNotFoundError naming the first file a checkpoint folder lacks, before anything is built.

    Without config.json, transformers builds a full-size default Qwen2.5-VL (21 GB: killed on a 24 GB
    machine); without the chat template it fails in a traceback; without tokenizer.json the image tokens
    go missing, and the error says "Image features and image tokens do not match": the wrong cause.
    """
    def has(name):
        return os.path.isfile(os.path.join(folder, name))

    def says(name, key):  # a JSON file of the folder that holds `key` (older checkpoints keep the template there)
        try:
            return key in json.load(open(os.path.join(folder, name)))
        except (OSError, ValueError):
            return False
    index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if has(n)), None)
    try:  # a sharded checkpoint: every shard its index names
        shards = sorted(set(json.load(open(os.path.join(folder, index)))["weight_map"].values())) if index else []
    except (ValueError, KeyError, TypeError, AttributeError):
        shards = [index + " (it is not a weight index)"]
    needs = [("config.json", has("config.json")),
             ("weights (model.safetensors)", index or has("model.safetensors") or has("pytorch_model.bin")),
             *((shard, has(shard)) for shard in shards),
             ("tokenizer.json", has("tokenizer.json") or has("vocab.json") and has("merges.txt")),
             ("chat template (chat_template.jinja)", has("chat_template.jinja") or has("chat_template.json")
              or says("tokenizer_config.json", "chat_template") or says("processor_config.json", "chat_template")),
             ("image processor settings (preprocessor_config.json)",
              has("preprocessor_config.json") or says("processor_config.json", "image_processor"))]
    missing = next((what for what, ok in needs if not ok), None)
    if missing:
        raise FileNotFoundError(f"model folder {folder} has no {missing}: not a whole checkpoint (give OUT/final, "
                                "or a folder from `hf download NAME --local-dir DIR`)")


def _from_pretrained(name, dtype, attn, **hub):
    """Qwen2.5-VL and its processor from a folder or the hub; hub: e.g. local_files_only=True."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    kw = {"attn_implementation": attn} if attn else {}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype, **kw, **hub)
    return model, AutoProcessor.from_pretrained(name, **hub)


def _hub_error(name, reason):
    return OSError(f"cannot load model '{name}' ({reason}). Without network, download it elsewhere "
                   f"(hf download {name} --local-dir DIR) and pass the folder, or use --model tiny for a smoke run.")


def _check_hub(name):
    """One request to the hub before a download: without network transformers' download retries
    for 30 s (5 retries, 11 warning lines) before it fails; this fails in under a second."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import RepositoryNotFoundError
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(name, "not in the local hub cache, and HF_HUB_OFFLINE is set")
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:  # also a gated or private model without a login
        raise FileNotFoundError(f"no model '{name}' on the Hugging Face hub (or it is private): "
                                "check the name, or pass a local folder") from None
    except Exception as e:  # no network: the hub's HTTP client raises its own (httpx2) errors, not OSError
        raise _hub_error(name, f"the hub is unreachable: {str(e).splitlines()[0][:120]}") from None


def tiny_tokenizer(corpus=(), vocab_size=512):
    """A byte-level BPE tokenizer trained here, with Qwen's pre-tokenizer, special tokens and template.

    Trained on the prompts, the silence string and `corpus` (e.g. the toy world's answers) so that
    NO REPLY is two tokens and the first one decides, as with the real Qwen vocabulary.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    bpe = Tokenizer(models.BPE())
    # Qwen's split (words, digits one by one, line ends), then bytes as printable characters (GPT-2's trick)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    texts = [SYSTEM_PROMPT, DEFAULT_SYSTEM_PROMPT, SILENCE, "user", "assistant", "system"] + list(corpus)
    # all 256 byte symbols in the vocabulary, so any text encodes, even bytes the texts never had
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    # <|endoftext|> is already there (Qwen2Tokenizer's default unk, eos and pad token)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


# The toy world's vocabulary, so the tiny tokenizer has whole-word tokens for it.
TOY_CORPUS = [f"A {c} square appeared on the {p}." for c in
              ("red", "green", "blue", "yellow", "magenta", "cyan", "white") for p in ("left", "right", "top", "bottom")
              ] + ["Tell me whenever a new shape appears.", "Tell me the colour of each new shape.",
                   "Red. Green. Blue. Yellow. Magenta. Cyan. White.", "So far: 0123456789, and"]


def tiny_model(seed=0, hidden=128, layers=2, vision_hidden=64, vision_depth=2):
    """A random Qwen2.5-VL of ~0.7M parameters with a real processor: the same classes as the 3B model.

    The vision tower keeps Qwen's 14-px patches and 2×2 merge, so an 84×84 frame is 9 LLM tokens.
    Everything is built offline; `save_pretrained` / `load_model(folder)` round-trip it.
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    tok = tiny_tokenizer(TOY_CORPUS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        # 4 query heads share 2 key/value heads (grouped-query attention, as the 3B model's 16 and 2)
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True,
                         # mrope splits each head's rotary half-dims into (t, h, w): 3B uses [16, 24, 24] of 64
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT]),
        # the vision blocks attend within windows but the last, as Qwen's (3B: full attention in 4 of 32)
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    return model, processor


# ----------------------------------------------------------------------------
# 6. The streaming engine (docs/streaming.md)
#
# Read `Stream.turn` first: its plain path is the whole idea (prefill the new user turn into the KV
# cache with explicit positions, then `generate` the reply). Fast silence and `Group` (the G rollouts
# of a GRPO episode as one batch) are optimisations after it, each marked; tests hold both to the
# plain path.
#
# Randomness: sampling uses torch's default generator of the model's device (`generate` takes no
# generator, and our draft check draws from the same one), so `torch.manual_seed(s)` before a turn
# makes it reproducible on a CPU and on a GPU alike. GRPO seeds it per step from (seed, step, rank).

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
    """An empty KV cache whose keys and values are kept in the dtype attention computes in.

    That is the model's dtype, or the autocast dtype when the cache is made under autocast (GRPO's rollouts:
    bf16 autocast over fp32 weights). There a plain DynamicCache would hold fp32: rope multiplies the bf16 keys
    by fp32 cos/sin, and the values are promoted to the keys' dtype when concatenated. That is twice the
    memory, and every decoding step would cast the whole cache back to bf16 for attention (sdpa is a bf16 op
    under autocast). Storing bf16 rounds exactly what attention rounds anyway.
    """
    from transformers import DynamicCache
    device = model.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype

    class Cache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)
    return Cache(config=model.config)


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
    (tests/test_mmduet2.py) holds every logit to one full forward over them.
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

        The cache is `generate`'s to extend; it stops on <|im_end|> or when the turn's budget is spent.
        """
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
        key = hashlib.blake2b(b"".join(p.numpy().tobytes() for p in chunk.pixels) + str(chunk.grids).encode()).digest()
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

        Fed assistant turns get mask 0: in a stream the mask marks only what the policy generated.
        """
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
        """Walk the draft's logits (row i predicts the token after draft[:i]) as far as the model agrees.

        Returns the tokens emitted (the accepted draft, then the model's own choice where it disagreed),
        their log-probs, and how many draft tokens the cache must drop.
        """
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

    The emitted token is distributed exactly as `probs`, whatever the draft.
    """
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
    call. Each row is a Stream without a cache of its own (its
    `seq`, `cached`, `pos` are its own); the group holds one KV cache of batch G and an attention mask
    (G, cache length) that is 0 where a column is not the row's own token. Positions are per row and
    count only the row's own tokens, so each row computes exactly what its own Stream would;
    tests/test_mmduet2.py holds every row to a full forward over its own ids.
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
# 7. Runs: the toy preset, and one checkpoint format with one resume path for sft.py and grpo.py
#
#   OUT/metrics.jsonl   one line per optimizer step (rank 0)
#   OUT/step-000050/    model + processor (save_pretrained: `load_model(folder)` opens it), trainer.json (the
#                       step and the settings a resume must match), state/ (accelerator.save_state: weights,
#                       optimizer, scheduler, every rank's RNG). Written to OUT/.tmp-step-000050, then renamed.
#   OUT/final/          the same without state/: what `grpo.py --init` and `infer.py --model` take
# Several nodes: OUT must be one shared folder (every rank reads the checkpoint; each writes its own RNG state).
# The format in full: docs/formats.md, "Runs".

def argument_parser(script, description):
    """An ArgumentParser whose errors are one line, `script: what is wrong`, as every other bad input is."""
    import argparse
    p = argparse.ArgumentParser(description=description)
    # argparse would print the whole usage block before the message
    p.error = lambda message: p.exit(2, f"{script}: {message} ({script} --help lists the flags)\n")
    return p


def parse_with_preset(parser, preset, argv=None):
    """parser.parse_args(argv), where --toy first makes `preset` the defaults: a flag the user types still wins."""
    # a first pass only to see --toy; the preset becomes the defaults, so typed flags still override it
    if parser.parse_known_args(argv)[0].toy:
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


def preset_help(preset):
    """The --toy flag's help: the values it sets, as flags."""
    flags = [f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in preset.items()]
    return "the CPU toy-world preset: " + ", ".join(flags) + " (any flag you type overrides it)"


def checkpoints(out):
    """The complete step checkpoints in OUT, oldest first (a half-written one is still .tmp-*)."""
    steps = [d for d in os.listdir(out) if d.startswith("step-")] if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in sorted(steps)]  # zero-padded step numbers sort as text


def file_digest(path):
    """A file's content as 16 hex digits of its sha256 (None if it cannot be read: its loader says why next).

    What a resume compares for the files a run reads: the same file under another spelling of its path is
    the same run, and a file changed under the run is not (it would change the episodes or the data order).
    """
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:16]
    except OSError:
        return None


def settings_differ(saved, settings):
    """The one resume-settings check: "key: saved there, now here" for every setting that differs, or "".

    Every key either side names is compared (a missing one reads None), so a setting only the earlier run
    recorded counts too. sft.py and grpo.py compare a checkpoint's trainer.json, data.py build its build.json.
        settings_differ({"seed": 0, "world": 2}, {"seed": 1, "world": 2}) → "seed: 0 there, 1 now"
    """
    keys = [*settings, *(k for k in saved if k not in settings)]
    return ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in keys
                     if saved.get(k) != settings.get(k))


def write_atomic(path, text):
    """The one atomic write: replace `path` by `text` in one step, so an interruption leaves the old file or the
    new, never half of one (a checkpoint folder gets the same by a rename: save_checkpoint)."""
    tmp = f"{path}.tmp"  # beside the target: one filesystem, so the rename below is atomic
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:  # a full disk: no half-written .tmp is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def start_run(out, resume, settings, is_main=True):
    """Where a run starts: (checkpoint folder or None, its step).

    A fresh run refuses an OUT that holds another run: the two would mix (metrics, --keep deleting the
    new checkpoints, `final` replaced). --resume continues from the newest complete checkpoint, refuses
    one written with other `settings`, and cuts metrics.jsonl back to its step: the steps after it are
    run again and logged once.
    """
    metrics = os.path.join(out, "metrics.jsonl")
    found = checkpoints(out)
    if not resume:
        # any trace of a run counts: a checkpoint, its metrics, or a final model
        used = found or [p for p in (metrics, os.path.join(out, "final")) if os.path.exists(p)]
        if used:
            raise SystemExit(f"{out} holds an earlier run ({os.path.basename(used[-1])}): pass --resume to continue "
                             "it, or use another --out (or delete the folder)")
        os.makedirs(out, exist_ok=True)
        return None, 0
    # --resume into an OUT without a checkpoint starts from step 0 (a run killed before its first save)
    ckpt, step = (found[-1], json.load(open(os.path.join(found[-1], "trainer.json")))) if found else (None, None)
    if ckpt:
        diff = settings_differ(step["settings"], settings)
        if diff:
            raise SystemExit(f"{ckpt} was written by a run with other settings ({diff}): cannot resume it")
        step = step["step"]
    if is_main and os.path.exists(metrics):  # keep the lines up to the checkpoint's step (0: none)
        lines = [line for line in open(metrics) if line.strip() and json.loads(line)["step"] <= (step or 0)]
        write_atomic(metrics, "".join(lines))
    return ckpt, step or 0


def resume_hint(out):
    """What a run in OUT has kept, and how to go on (said when a run stops early)."""
    kept = checkpoints(out)
    return f"the newest checkpoint is {kept[-1]}: the same command + --resume continues" if kept else \
        "no checkpoint was written yet"


@contextlib.contextmanager
def said_once(accelerator):
    """Start-up checks (the data, the model folder) fail alike on every rank: rank 0 says why, the others exit 1
    quietly, so a two-rank run does not print each line twice, interleaved."""
    try:
        yield
    except SystemExit as e:
        raise SystemExit(e.code if accelerator.is_main_process else 1) from None


def first_failure(accelerator, error):
    """Every rank calls this at the same point of a step with its own one-line error or None; all get back the
    first failure of any rank ("rank 1: cannot decode video ..."), or None.

    A rank that failed alone (an unreadable video, a judge that went away) and exited alone would leave the
    others in their next collective until its timeout: NCCL does not notice a peer that is gone, nor does a
    launcher on another node. Said here, every rank stops within a step, with one line from rank 0.
    """
    from accelerate.utils import gather_object
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]  # [rank 0's, rank 1's, ...]
    failed = [f"rank {rank}: {e}" if len(errors) > 1 else e for rank, e in enumerate(errors) if e]
    return failed[0] if failed else None


def save_checkpoint(accelerator, model, processor, out, name, step, settings, keep=2):
    """Write OUT/name (step-NNNNNN with its state/, or final without) atomically; keep the last `keep` steps."""
    tmp, dst = os.path.join(out, f".tmp-{name}"), os.path.join(out, name)
    main = accelerator.is_main_process
    # rank 0 writes the model, every rank its own RNG state; wait_for_everyone keeps them in step, so no
    # rank writes into a folder being cleared or renamed
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed half-way
    accelerator.wait_for_everyone()
    if main:  # save_pretrained + processor: a folder that load_model / infer.py opens
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=accelerator.get_state_dict(model))
        processor.save_pretrained(tmp)
        json.dump({"step": step, "settings": settings}, open(os.path.join(tmp, "trainer.json"), "w"), indent=1)
    if name != "final":  # every rank writes its own RNG state into the shared folder
        accelerator.save_state(os.path.join(tmp, "state"), safe_serialization=False)  # safetensors refuses the
        # tied embedding / lm_head pair that the optimizer state refers to twice
    accelerator.wait_for_everyone()
    if main:
        old = os.path.join(out, f".old-{name}")
        if os.path.exists(dst):  # the same step saved again (after a resume): swap, never leave a gap
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        for path in checkpoints(out)[:-keep] if keep and name != "final" else []:  # keep=0: keep all
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
