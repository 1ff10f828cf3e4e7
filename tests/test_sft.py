"""sft.py end to end on the tiny model: it learns, 2 CPU ranks stay in sync and match 1 rank, resume is exact.

Every run is a real subprocess of `sft.py` (the script is flat, as a reader runs it); the runs are
module-scoped fixtures shared by the tests. The data: 3 dialogues in our format (tiny mp4s written
with PyAV) + 1 in the released MMDuet2 format (JPG frames), in two JSONL files.
"""
import glob
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmduet2
from conftest import another_run_writing, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "Tell me whenever a new shape appears."
ANSWERS = ["A red square appeared on the left.", "A blue square appeared on the top.",
           "A green square appeared on the right.", "A yellow square appeared on the bottom."]
STEPS, SAVE_EVERY = 20, 5
# sft.py through tests/ddp_probe.py: each rank also saves its own weights and the dialogues it read (params-rankR.pt)
PROBE = (os.path.join("tests", "ddp_probe.py"), "sft")


def dialogue(k, answer):
    """Two turns of two frames (an 8 s video at 2 s per frame): silent first, then the answer."""
    return [{"role": "user", "content": mmduet2.IMAGE * 2 + QUESTION, "time": 4.0},
            {"role": "assistant", "content": mmduet2.SILENCE, "time": 4.0},
            {"role": "user", "content": mmduet2.IMAGE * 2, "time": 8.0},
            {"role": "assistant", "content": answer, "time": 8.0}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ours.jsonl (3 dialogues over mp4s) + released.jsonl (1 dialogue over JPG frames)."""
    from PIL import Image
    d = tmp_path_factory.mktemp("sft_data")
    os.makedirs(d / "videos")
    with open(d / "ours.jsonl", "w") as f:
        for k in range(3):
            write_video(d / "videos" / f"v{k}.mp4", seconds=8, seed=k)
            f.write(json.dumps({"id": f"ours{k}", "video": f"videos/v{k}.mp4", "interval": 2.0,
                                "frames_per_turn": 2, "messages": dialogue(k, ANSWERS[k])}) + "\n")
    rng = np.random.default_rng(3)
    os.makedirs(d / "frames")
    for j in range(4):
        Image.fromarray(rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)).save(d / "frames" / f"{j}.jpg")
    with open(d / "released.jsonl", "w") as f:
        f.write(json.dumps({"messages": dialogue(3, ANSWERS[3]),
                            "images": [{"path": f"frames/{j}.jpg"} for j in range(4)],
                            "metadata": {"question_id": "q3", "video_id": "v3"}, "id": "released3"}) + "\n")
    return d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(data, out, *extra, nproc=1, grad_accum=2, check=True, program=("sft.py",), threads=1):
    """Run sft.py on the test data (1 process, or `accelerate launch` with nproc gloo ranks); `program`: what runs it."""
    flags = ["--model", "tiny", "--data", str(data / "ours.jsonl"), str(data / "released.jsonl"),
             "--out", str(out), "--lr", "2e-3", "--max-steps", str(STEPS), "--grad-accum", str(grad_accum),
             "--save-every", str(SAVE_EVERY), "--keep", "0", "--workers", "0", "--mixed-precision", "no",
             "--no-grad-checkpointing", *extra]
    if nproc == 1:
        cmd = [sys.executable, *program, *flags]
    else:  # explicit flags: no accelerate config file is needed or read
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *program, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def params(path):
    return torch.load(path)["params"]


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    """1 process, accumulation 2: 2 dialogues per optimizer step."""
    out = tmp_path_factory.mktemp("sft_one")
    p = run_sft(data, out, program=PROBE)
    return out, p


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """2 gloo ranks, accumulation 1: the same 2 dialogues per optimizer step, one per rank."""
    out = tmp_path_factory.mktemp("sft_two")
    p = run_sft(data, out, nproc=2, grad_accum=1, program=PROBE)
    return out, p


def test_loss_falls_and_schedule(one_rank):
    out, p = one_rank
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert first > 4.0 and last < 0.5 * first, (first, last)  # random init ≈ ln(vocab); overfits 4 dialogues
    # 5% warm-up of 20 steps = 1 step at lr 0, then cosine from the peak down towards 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(2e-3) and rows[-1]["lr"] < 1e-4
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "tokens per frame: 9 " in p.stdout  # 84×84 frames = 3×3 merged patches, printed at start-up


def test_first_loss_is_the_masked_token_mean(one_rank, data):
    """Step 1's logged loss = −Σ log p / N over its two dialogues, recomputed with mmduet2 directly.

    The independent reference: the same seeded shuffle, the released and our loaders, the encoder's
    mask (assistant text + <|im_end|>, NO REPLY included) and mmduet2.forward_logprobs.
    """
    out, _ = one_rank
    records = [(data / "ours.jsonl", r) for _, r in mmduet2.read_jsonl(data / "ours.jsonl")]
    records += [(data / "released.jsonl", r) for _, r in mmduet2.read_jsonl(data / "released.jsonl")]
    order = list(range(len(records)))
    random.Random(0).shuffle(order)  # seed 0, epoch 0
    model, processor = mmduet2.load_model("tiny")
    logps = []
    for i in order[:2]:
        messages, frames = mmduet2.load_dialogue(records[i][1], root=str(data))
        seq = mmduet2.encode_dialogue(processor, messages, frames, max_tokens=10_000)
        with torch.no_grad():
            logps.append(mmduet2.forward_logprobs(model, seq))
    logp = torch.cat(logps)
    row = metrics(out)[0]
    assert row["tokens"] == len(logp)
    assert row["loss"] == pytest.approx(-logp.sum().item() / len(logp), rel=1e-5)


def test_two_ranks_stay_in_sync_and_match_one_rank(one_rank, two_ranks):
    out1, _ = one_rank
    out2, p = two_ranks
    assert json.load(open(os.path.join(out2, "final", "trainer.json")))["settings"]["world"] == 2, p.stdout
    r0, r1 = (torch.load(os.path.join(out2, f"params-rank{r}.pt")) for r in (0, 1))
    assert r0["examples"][0] != r1["examples"][0]  # the ranks trained on different dialogues...
    for name, value in r0["params"].items():  # ... and still hold the very same weights (DDP all-reduce)
        assert torch.equal(value, r1["params"][name]), name
    # 2 ranks × accumulation 1 = 1 rank × accumulation 2 over the same pairs: same losses, same weights
    for a, b in zip(metrics(out1), metrics(out2)):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    one = params(os.path.join(out1, "params-rank0.pt"))
    for name, value in one.items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_equals_an_uninterrupted_run(one_rank, data, tmp_path):
    """Interrupt after step 10 (delete everything later), resume: the final weights are the same."""
    out1, _ = one_rank
    out = tmp_path / "resumed"
    shutil.copytree(out1, out)
    for path in ["final", "params-rank0.pt", *[f"step-{s:06d}" for s in range(15, STEPS + 1, SAVE_EVERY)]]:
        shutil.rmtree(out / path) if (out / path).is_dir() else os.remove(out / path)
    os.makedirs(out / ".tmp-step-000015")  # a checkpoint cut short mid-write must be ignored
    p = run_sft(data, out, "--resume", program=PROBE)
    assert "resumed from" in p.stdout and "step-000010" in p.stdout
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, STEPS + 1))  # the lost steps are run again and logged once
    resumed, straight = params(out / "params-rank0.pt"), params(os.path.join(out1, "params-rank0.pt"))
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)
    # a run without --resume refuses a folder that holds another run's checkpoints
    p = run_sft(data, out, check=False)
    assert p.returncode != 0 and "pass --resume to continue it" in p.stderr, p.stderr[-2000:]
    # the data are compared by content: the same files under another spelling of their paths resume
    # (nothing left to run), other data in them (another order of examples) is refused
    spelled = [str(data / "." / "ours.jsonl"), str(data / "released.jsonl")]
    assert "resumed from" in run_sft(data, out, "--resume", "--data", *spelled).stdout
    changed = tmp_path / "ours.jsonl"
    changed.write_text(open(data / "ours.jsonl").read().replace(ANSWERS[0], "A pink square appeared on the left.")
                       .replace('"videos/', f'"{data}/videos/'))  # (its videos where they are)
    p = run_sft(data, out, "--resume", "--data", str(changed), spelled[1], check=False)
    assert p.returncode != 0 and "other settings (data_sha256: [" in p.stderr, p.stderr[-2000:]


def test_toy_trains_on_one_thread(data, tmp_path):
    """--toy runs torch on one thread: its float sums, and so the toy's results, are then the same on a machine
    with any number of cores (at 1 and 2 threads a toy model's gradients differ in their last bits, and 4,000
    steps of SFT grew that to 51.1 against 54.7 PAUC: docs/toy.md). Without --toy, torch's own choice stays."""
    for flags, threads in ((["--toy"], 1), ([], 2)):
        out = tmp_path / f"toy{bool(flags)}"
        run_sft(data, out, *flags, "--max-steps", "1", program=PROBE, threads=2)
        assert torch.load(out / "params-rank0.pt")["threads"] == threads


def test_checkpoints_load_with_mmduet2(one_rank):
    out, _ = one_rank
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "step-*"))) == \
        [f"step-{s:06d}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    model, processor = mmduet2.load_model(os.path.join(out, "final"))
    trained = params(os.path.join(out, "params-rank0.pt"))
    for name, value in model.named_parameters():
        assert torch.equal(value, trained[name]), name
    # the vision encoder stayed frozen, its merger was trained
    tiny, _ = mmduet2.load_model("tiny")
    init = dict(tiny.named_parameters())
    frozen, merger = "model.visual.blocks.0.mlp.up_proj.weight", "model.visual.merger.mlp.0.weight"
    assert torch.equal(trained[frozen], init[frozen]) and not torch.equal(trained[merger], init[merger])


def test_two_ranks_train_on_records_without_images(data, tmp_path):
    """The released layout with LLaVA-style offline data mixed in: every second record has no image. A rank whose
    micro-batch has no frame gives the vision merger no gradient; DDP must expect it (it crashed: "Expected to have
    finished reduction..."). 2 ranks × accumulation 2 stay in sync and equal 1 rank × accumulation 4."""
    def text_only(k):
        return [{"role": "system", "content": mmduet2.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": f"What is {k} plus {k}?"}, {"role": "assistant", "content": f"{2 * k}."}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"messages": dialogue(k, ANSWERS[k]), "images": [
        {"path": str(data / "frames" / f"{j}.jpg")} for j in range(4)]} if k % 2 == 0 else
        {"messages": text_only(k), "images": []}) + "\n" for k in range(4)))
    steps = ["--data", str(mixed), "--max-steps", "6"]
    run_sft(data, tmp_path / "two", *steps, nproc=2, grad_accum=2, program=PROBE)
    run_sft(data, tmp_path / "one", *steps, grad_accum=4, program=PROBE)
    r0, r1, one = (params(tmp_path / run / f"params-rank{r}.pt") for run, r in (("two", 0), ("two", 1), ("one", 0)))
    tiny = dict(mmduet2.load_model("tiny")[0].named_parameters())
    for name, value in r0.items():
        assert torch.equal(value, r1[name]), name
        torch.testing.assert_close(value, one[name], rtol=1e-4, atol=1e-5, msg=name)  # as in the test above
    merger = "model.visual.merger.mlp.0.weight"
    assert not torch.equal(r0[merger], tiny[merger])  # the merger learned from the records that have frames


def test_one_rank_failing_stops_every_rank_with_one_line(data, tmp_path):
    """2 gloo ranks, one of which meets a frame file that is there but is not an image (the up-front check sees files,
    not pixels): every rank stops at that step, with one line from rank 0 naming the rank, the file and the line
    (the other rank used to die in its next collective)."""
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "0.jpg").write_bytes(b"not a jpeg" * 100)
    for j in range(1, 4):
        shutil.copy(data / "frames" / f"{j}.jpg", tmp_path / "frames")
    good = open(data / "ours.jsonl").readline().replace("videos/v0.mp4", str(data / "videos" / "v0.mp4"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + open(data / "released.jsonl").readline())
    p = run_sft(data, tmp_path / "out", "--data", str(bad), nproc=2, grad_accum=1, check=False)
    ours = [line for line in p.stderr.splitlines() if line.startswith("sft.py: ")]
    assert p.returncode != 0 and len(ours) == 1, p.stderr[-3000:]
    assert re.match(rf"sft.py: rank [01]: {re.escape(str(bad))}:2: UnidentifiedImageError: ", ours[0]), ours
    assert "Traceback" not in "".join(line for line in p.stderr.splitlines() if line.startswith("[rank"))


def test_bad_data_is_said_once_by_rank_0(data, tmp_path):
    """Data that fail the up-front check fail it on every rank alike: one line, from rank 0, nothing trained."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data / "ours.jsonl").readline().replace("videos/v0.mp4", "videos/nope.mp4"))
    p = run_sft(data, tmp_path / "out", "--data", str(bad), nproc=2, grad_accum=1, check=False)
    ours = [line for line in p.stderr.splitlines() if line.startswith("sft.py: ")]
    assert p.returncode != 0 and ours == [f"sft.py: {bad}:1: video not found: {tmp_path / 'videos' / 'nope.mp4'}: "
                                          "fix the data; nothing was trained"], p.stderr[-3000:]


def test_gradients_stay_views_of_ddp_buckets_under_accumulation(data, tmp_path):
    """2 ranks × accumulation 2: after every backward, the no_sync one included, the gradients are views into DDP's
    few buckets. Gradients set to None between steps (zero_grad's default) or before the first one are allocated
    afresh by the next no_sync backward, one per parameter beside the buckets: +11.6 GiB at 3B."""
    out = tmp_path / "run"
    run_sft(data, out, "--max-steps", "3", nproc=2, grad_accum=2, program=PROBE)
    model = mmduet2.load_model("tiny")[0].model
    n_trained = len([*model.language_model.parameters(), *model.visual.merger.parameters()])  # 31 tensors
    for rank in (0, 1):
        counts = json.load(open(out / f"grad-storages-rank{rank}.json"))
        assert len(counts) == 3 * 2 and max(counts) <= 3 < n_trained, counts  # 3 steps × 2 backwards; the buckets
        # and its collectives wait 30 min: rank 0 writing a 55 GB checkpoint can outlast the 10-minute default
        assert json.load(open(out / f"timeout-rank{rank}.json")) == [30 * 60]


def test_malformed_lines_name_file_and_line(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = open(data / "ours.jsonl").readline()
    bad.write_text(good + '{"messages": [oops\n')
    p = run_sft(data, tmp_path / "out", "--data", str(bad), check=False)
    assert p.returncode != 0 and f"{bad}:2: malformed JSON" in p.stderr, p.stderr[-2000:]
    # well-formed lines whose data do not fit their placeholders: found at start-up, before the model loads
    # (it used to be when training reached them, the output folder then refusing a plain rerun)
    # (paths made absolute: these files live elsewhere than the data)
    good = good.replace('"videos/', f'"{data}/videos/')
    released = open(data / "released.jsonl").readline().replace('"frames/', f'"{data}/frames/')
    lines = {"missing video": good.replace("videos/v0.mp4", "videos/nope.mp4"),
             "short video": good.replace('"interval": 2.0', '"interval": 3.0'),  # 8 s at 3 s: 2 frames for 4
             "images": released.replace(f', {{"path": "{data}/frames/3.jpg"}}', ""),  # 3 images for 4 placeholders
             "missing image": released.replace("frames/3.jpg", "frames/9.jpg")}
    for i, (what, line) in enumerate(lines.items()):
        broken = tmp_path / f"broken{i}.jsonl"
        broken.write_text(good + line + line)  # two bad lines, after a good one
        p = run_sft(data, tmp_path / f"out{i}", "--data", str(data / "released.jsonl"), str(broken), check=False)
        message = {"missing video": f"video not found: {data / 'videos' / 'nope.mp4'}",
                   "short video": f"{data}/videos/v0.mp4 gives 2 frames at a 3 s interval, the dialogue has 4 <image> placeholders",
                   "images": "3 images for 4 <image> placeholders",
                   "missing image": f"frame file not found: {data / 'frames' / '9.jpg'}"}[what]
        assert p.returncode == 1 and p.stderr.splitlines()[-1] == (
            f"sft.py: {broken}:2: {message} (and 1 more bad line): fix the data; nothing was trained"), p.stderr[-2000:]
        assert "tokens per frame" not in p.stdout + p.stderr and not os.path.exists(tmp_path / f"out{i}" / "metrics.jsonl")


def test_released_layout_jpg_and_hdf5_frames(tmp_path):
    """The released MMDuet2-data SFT layout: `messages` with one <image> per frame, `images` paths relative to the
    JSONL that are JPGs or `file.hdf5:::index` (encoded JPEG bytes, or raw arrays), read end to end by sft.py."""
    import h5py
    from PIL import Image
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(8)]
    os.makedirs(tmp_path / "frames" / "ego")
    for j in range(4):  # the egocentric part: JPG files
        Image.fromarray(frames[j]).save(tmp_path / "frames" / "ego" / f"{j:04d}.jpg")
    with h5py.File(tmp_path / "frames" / "web_jpeg.hdf5", "w") as h:  # the web part: one dataset of JPEG bytes
        encoded = []
        for f in frames[4:]:
            buf = __import__("io").BytesIO()
            Image.fromarray(f).save(buf, format="JPEG")
            encoded.append(np.frombuffer(buf.getvalue(), np.uint8))
        h.create_dataset("frames", data=np.array(encoded, dtype=object), dtype=h5py.vlen_dtype(np.uint8))
    with h5py.File(tmp_path / "frames" / "web_raw.hdf5", "w") as h:  # or of raw (H, W, 3) arrays
        h.create_dataset("frames", data=np.stack(frames[4:]))
    os.makedirs(tmp_path / "sft")
    paths = {"ego": [f"../frames/ego/{j:04d}.jpg" for j in range(4)],
             "jpeg": [f"../frames/web_jpeg.hdf5:::{j}" for j in range(4)],
             "raw": [f"../frames/web_raw.hdf5:::{j}" for j in range(4)]}
    lines = [json.dumps({"messages": dialogue(k, ANSWERS[k]), "images": [{"path": p} for p in paths[part]],
                         "metadata": {"question_id": f"q{k}", "video_id": part}}) for k, part in enumerate(paths)]
    (tmp_path / "sft" / "released.jsonl").write_text("\n".join(lines) + "\n")
    for k, part in enumerate(paths):  # the reader gives back the very frames (JPEG: within its loss)
        _, got = mmduet2.load_dialogue(json.loads(lines[k]), root=str(tmp_path / "sft"))
        want = frames[:4] if part == "ego" else frames[4:]
        tol = 0 if part == "raw" else 60
        assert all(g.shape == (84, 84, 3) and np.abs(g.astype(int) - w).mean() <= tol for g, w in zip(got, want))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "sft.py", "--model", "tiny", "--data", str(tmp_path / "sft" / "released.jsonl"),
                        "--out", str(out), "--max-steps", "3", "--grad-accum", "1", "--workers", "0", "--save-every", "0",
                        "--no-grad-checkpointing"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in metrics(out))
    # a missing index or file: one line naming the file and line of the record
    bad = tmp_path / "sft" / "bad.jsonl"
    for broken, message in (("web_raw.hdf5:::3", "no frame '9'"), ("ego/0003.jpg", "frame file not found")):
        bad.write_text(lines[0] + "\n" + lines[2 if "hdf5" in broken else 0].replace(broken, broken.replace("3", "9")) + "\n")
        p = subprocess.run([sys.executable, "sft.py", "--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "x"),
                            "--max-steps", "2", "--grad-accum", "1", "--workers", "0", "--save-every", "0"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and last.startswith(f"sft.py: {bad}:2: ") and message in last, p.stderr[-1500:]
        shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    with another_run_writing(out, folder=True) as pid:
        p = subprocess.run([sys.executable, "sft.py", "--model", "tiny", "--data", "x.jsonl", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(f"sft.py: {out} is being written by another run (pid {pid} on ")
    assert os.listdir(out) == [".lock"]


@pytest.mark.parametrize("argv, message", [
    (["--grad-accum", "0"], "--grad-accum and --epochs must be >= 1"), (["--lr", "-1"], "--lr must be in (0, 1)"),
    (["--warmup", "1"], "--warmup in [0, 1)"), (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--keep", "-1"], "--keep must be >= 0"), (["--model", "tiny"], "--data is required"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    import sft
    with pytest.raises(SystemExit) as e:
        sft.parse_args(argv + (["--data", "x.jsonl"] if "--model" not in argv else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("sft.py: ") and message in err and err.count("\n") == 1, err


def test_a_folder_as_data_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "sft.py", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"sft.py: {tmp_path} is a folder: give the JSONL file(s) in it"
