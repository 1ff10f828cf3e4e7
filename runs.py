"""Runs: the plumbing the scripts share at their start and end (flags, outputs, training setup, checkpoints, resume).

Role: sft.py, grpo.py, infer.py, data.py and evaluate.py call it; none of the lecture lives here. It imports nothing
of ours and, at the top, only the standard library (torch, accelerate and transformers are imported inside the
functions that need them).

- Flags: `argument_parser` (errors in one line) and the --toy preset (`parse_with_preset`, `preset_help`).
- Outputs: `hold_output` makes this process the one writer of a file or a run's folder; `write_atomic`.
- Training: `accelerator` (DDP under accelerate, OUT held), `trainable` (what the paper freezes, gradients ready
  for DDP's buckets).
- Checkpoints: one format and one resume path for sft.py and grpo.py (`start_run`, `settings_differ`,
  `save_checkpoint`, `resume_hint`, `file_digest`); on several ranks a failure is said once (`said_once`,
  `first_failure`).

Not in the paper (its released code runs under DeepSpeed/verl); the loops that use it are Sec. 4.2-4.3's.
    python -m pytest tests/test_runs.py -q

The formats in full: docs/formats.md, "Runs". Tests: tests/test_runs.py, and the resume tests of
tests/test_sft.py and tests/test_grpo.py.
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket


# ----------------------------------------------------------------------------
# Flags: errors in one line, and the --toy preset

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


# ----------------------------------------------------------------------------
# Checkpoints: one format with one resume path for sft.py and grpo.py
#
#   OUT/metrics.jsonl   one line per optimizer step (rank 0)
#   OUT/step-000050/    model + processor (save_pretrained: `mmduet2.load_model(folder)` opens it), trainer.json
#                       (the step and the settings a resume must match), state/ (accelerator.save_state: weights,
#                       optimizer, scheduler, every rank's RNG). Written to OUT/.tmp-step-000050, then renamed.
#   OUT/final/          the same without state/: what `grpo.py --init` and `infer.py --model` take
# Several nodes: OUT must be one shared folder (every rank reads the checkpoint; each writes its own RNG state).
# The format in full: docs/formats.md, "Runs".

def accelerator(script, out, mixed_precision, find_unused_parameters=False, **kwargs):
    """The Accelerator sft.py and grpo.py train under, and OUT held by rank 0 (one run per OUT: a second would mix
    its checkpoints and metrics with this one's).

    cpu=True on a machine without a GPU makes `accelerate launch --multi_gpu` real gloo DDP: without it the ranks
    run as independent processes and never synchronise (docs/streaming.md, "Multi-process on CPU").
    gradient_as_bucket_view: DDP's all-reduce buckets hold the gradients themselves, not a second copy (11.6 GiB
    at 3B: docs/full-scale.md). timeout: the longest a healthy rank waits in a collective is while rank 0 writes a
    step checkpoint (55 GB at 3B: past NCCL's 10-minute default to a shared filesystem at 2 nodes); a rank that
    failed is not waited for (first_failure).
    """
    import datetime
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers' loading/saving bars would break up the training bar
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, find_unused_parameters=find_unused_parameters)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, **kwargs,
                      kwargs_handlers=[ddp, InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=30))])
    if acc.is_main_process:
        try:
            hold_output(out, folder=True)
        except ValueError as e:
            raise SystemExit(f"{script}: {e}") from None
    return acc


def trainable(model, grad_checkpointing, train_vision=False):
    """Freeze what the paper freezes and make the rest ready for DDP: the list of trained parameters.

    Paper: the vision encoder (patch embedding + ViT blocks) is frozen; the merger, which maps its features into the
    LLM's embedding space, is trained with the whole LLM (GRPO keeps that: the released RL config does not say).
    The gradients exist before DDP wraps the model, so that DDP turns each one into a view of its all-reduce buckets
    at once, and zero_grad(set_to_none=False) keeps them so. A gradient that is None when a no_sync micro-batch runs
    is allocated afresh beside the buckets: a second copy of every gradient (+11.6 GiB at 3B). (Zeros, not None: a
    step in which no rank saw a frame still moves the merger by AdamW's momentum, as in any loop that zeroes.)
    """
    import torch
    model.model.visual.requires_grad_(train_vision)
    model.model.visual.merger.requires_grad_(True)
    if grad_checkpointing:  # non-reentrant: works with frozen inputs and with DDP; active in train mode only
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    return trained


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
    return ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differing(saved, settings))


def differing(saved, settings):
    """The keys whose values differ, of every key either side names (a missing one reads None): the rule of
    settings_differ, for a caller that words its own message (infer.py names them as flags)."""
    return [k for k in [*settings, *(k for k in saved if k not in settings)] if saved.get(k) != settings.get(k)]


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


# ----------------------------------------------------------------------------
# Outputs: one writer at a time (every script's --out, eval's cache and --json)

_HELD = {}  # lock file -> its open file: held, and so locked, until this process exits


def hold_output(path, folder=False):
    """Make this process the one writer of `path` (a file, or a run's folder) until it exits; if another
    process writes it, a one-line ValueError naming the path and that process (two runs on one output
    would write every record twice, or interleave two runs' records).

    An advisory lock (flock) on a lock file: FOLDER/.lock, or .NAME.lock beside a file. The kernel drops
    it when the process's files close, which every exit does: a crash, a kill -9 or an out-of-memory kill
    leaves no stale lock to refuse the rerun (a pid file would). The lock file stays (deleting it would race
    with a run that is opening it) and holds the writer's pid, to name it. Asking again in the same process
    (a test calling main twice) is a no-op.
    """
    head, name = (path, ".lock") if folder else (os.path.dirname(path), f".{os.path.basename(path)}.lock")
    lock = os.path.realpath(os.path.join(head, name))  # another spelling of the same path is the same lock
    if lock in _HELD:
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; two runs on one output are not caught there
        return
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    f = open(lock, "a+")  # "a+": open without emptying what a holder wrote
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # NB: refuse at once, never wait for the other run
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "its pid not written yet"
        f.close()
        raise ValueError(f"{path} is being written by another run ({holder}): wait for it to end, "
                         "or give this one another output") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")  # the host too: a run folder may be shared by nodes
    f.flush()
    _HELD[lock] = f
