"""MMDuet2's hub: the chat template, frames, token ids and model loading (paper Sec. 4.1, Appendix A).

Role in the pipeline: every script imports this file, and it imports none of them.

    data.py ──▶ sft.py ──▶ grpo.py ──▶ infer.py          (reward.py stands alone)
          \\________ all of them use mmduet2.py ________/

Top to bottom (what we take from the paper is collected in docs/paper.md):
1. Constants: the proactive system prompt of the paper's Fig. 2, the silence string, the special tokens.
2. Frames: a video sampled at a fixed interval with decord, one frame at a time; the time of each user
   turn; the size of a frame, through qwen-vl-utils (128 LLM tokens per frame by default).
3. Dialogue files: our SFT JSONL and the released MMDuet2 SFT JSONL (docs/formats.md).
4. Token ids in, token ids out: a conversation encoded message by message as deltas through the
   checkpoint's own chat template, and positioned with Qwen2.5-VL's 3-D rope, chunk by chunk.
5. Models: `from_pretrained` on the hub or a folder, or `tiny` (a random Qwen2.5-VL, for tests and the toy world).
Built on it: engine.py (the streaming engine); beside it: runs.py (the scripts' flags and checkpoints).

Departure: FRAME_TOKENS caps frames at inference too, where the released code set no cap.

    python -c "import mmduet2; m, p = mmduet2.load_model('tiny'); print(m.num_parameters())"
"""
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch


def _check_transformers(needed="5.23"):
    """Stop with one line when the installed transformers is older than `needed`.

    An older one runs wrong without an error: 5.17 takes `mm_encoder_outputs` (our cached vision features)
    into **kwargs, so cached turns go without their frames. Checked at import, not in load_model: every
    path (tools/bench.py's 3B architecture, the tests) passes through it before any data or model work.
    The version comes from the package's metadata: importing transformers would cost ~2 s here.
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
# `<|vision_start|><|image_pad|><|vision_end|>` (a video as `<|video_pad|>`: lmms-eval's offline benchmarks, Table 4);
# a conversation without a system turn gets the default.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"  # lmms-eval feeds videos
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
    """Send what C++ code writes to file descriptor 2 (which sys.stderr cannot catch) to /dev/null in the block."""
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


def read_frames(path, interval, start=0.0):
    """Yield `(t, frame)` for frame k = 0, 1, ... sampled at video time t = start + k·interval.

    `frame` is an (H, W, 3) uint8 RGB array, upright (decord applies a phone's rotation), the video's
    frame nearest time t by the presentation times (`_clock`: a variable frame rate is read right). A
    video of duration D gives count_frames(D, interval) frames, so every frame's turn time
    ((k+1)·interval, see `turn_times`) lies inside the video. Frames are decoded one at a time, so an
    hour-long video never sits in memory; a frame that fails to decode (a damaged file whose start is
    fine) is a one-line ValueError saying where. `start` skips to a clip (StreamingBench's time_stamp): the
    clip from `start` to the end is sampled as a video of its own, on the video's clock.
        10.5 s video, interval 2 → frames at t = 0, 2, 4, 6, 8 (5 frames); start 3 → 3, 5, 7 (3 frames)
    """
    if not 0 < interval < float("inf"):  # also refuses nan, which every comparison fails
        raise ValueError(f"frame interval must be > 0 s and finite, got {interval}")
    vr = _open_video(path)
    duration, frame_at = _clock(vr)
    n = count_frames(duration - start, interval)
    if n <= 0:
        clip = f" from {start:g} s" if start else ""
        raise ValueError(f"video {path} ({duration:.2f} s) is shorter{clip} than one frame interval ({interval} s)")
    period = duration / len(vr)  # the mean time between frames
    # far below the frame period, every frame would be fed many times over (at 0.001 s: 100 turns per
    # frame of a 10 fps video), for minutes, without a word
    if interval < period / 2:
        raise ValueError(f"frame interval {interval:g} s is far below the frame period of {path} ({period:.3g} s): "
                         f"each frame would be fed {period / interval:.0f} times; use an interval >= {period:.3g} s")
    for k in range(n):
        t = start + k * interval  # start 0: exactly k·interval, the times every earlier result rests on
        try:
            frame = vr[frame_at(t)].asnumpy()
        except Exception as e:  # decord's DECORDError: damaged bytes after a readable start
            # decord decodes ahead on a thread, so the damage may lie a few frames past this one
            raise ValueError(f"cannot decode video {path} (reading its frame at {t:g} s): "
                             f"{_decord_reason(e)}") from None
        yield t, _rgb(frame)


def turn_times(n_frames, interval, frames_per_turn):
    """Time of each user turn: frames fed so far × interval (the paper's end-of-turn convention).

    Turn j holds frames [j·fpt, (j+1)·fpt); the last turn may hold fewer.
        5 frames, 2 s, 2 per turn → [4.0, 8.0, 10.0]      3 frames, 1 s, 1 per turn → [1.0, 2.0, 3.0]
    """
    if frames_per_turn not in (1, 2):
        raise ValueError(f"frames per turn must be 1 or 2, got {frames_per_turn}")
    # turn j starts at frame j (a multiple of fpt) and ends after fpt frames, or the last frame
    return [min(j + frames_per_turn, n_frames) * interval for j in range(0, n_frames, frames_per_turn)]


def clock(t):
    """Stream time as [mm:ss] (with a decimal for sub-second intervals): 7.0 -> 00:07, 62.5 -> 01:02.5.
    infer.py prints replies so; engine.Window writes the times of the texts it keeps so."""
    m, s = divmod(t, 60)
    return f"{int(m):02d}:{s:02.0f}" if s == int(s) else f"{int(m):02d}:{s:04.1f}"


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
# whole dialogue at once, engine.Stream one turn at a time; both give the same ids (a test checks it).

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
             ("image processor settings (preprocessor_config.json or processor_config.json)",
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
    """A random Qwen2.5-VL of 0.6M parameters with a real processor: the same classes as the 3B model.

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
