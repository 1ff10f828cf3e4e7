"""Shared test fixtures: synthetic mp4s and the tiny Qwen2.5-VL, all built offline."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmduet2  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA, skipped without it (MMDUET2_TEST_DEVICE=cpu: a dry run on the CPU)")


def write_video(path, seconds, fps=10, size=84, seed=0):
    """A small mp4 whose frame i is filled with a colour that encodes i, plus noise (bench.write_mp4: PyAV, or
    OpenCV where PyAV is missing, as on the GPU machines)."""
    import bench
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(round(seconds * fps)):
        img = np.full((size, size, 3), (i * 7) % 256, np.uint8)
        img[:, :, 1] = rng.integers(0, 255)
        frames.append(img)
    return bench.write_mp4(path, frames, fps)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the random tiny Qwen2.5-VL."""
    return mmduet2.load_model("tiny")


def random_frames(n, seed=0, size=84):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="session")
def chatty():
    """A tiny model overfit on one dialogue, so greedy decoding is silent on some turns and replies on others."""
    model, processor = mmduet2.load_model("tiny")
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
