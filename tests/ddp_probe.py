"""Run by the tests, alone or under `accelerate launch` (2 gloo ranks): `python tests/ddp_probe.py sft|grpo FLAGS...`
runs that script's main and records what each rank did, into OUT:

- grad-storages-rankR.json: after every backward, how many storages the trained parameters' gradients live in. With
  DDP's gradient_as_bucket_view they are views into a few all-reduce buckets, one storage per bucket. A gradient
  that was None when a no_sync micro-batch ran is allocated afresh, one storage per parameter: a second copy of
  every gradient beside the buckets.
- timeout-rankR.json: the timeout each rank gave its process group.
- params-rankR.pt: this rank's own weights at the end (DDP must keep them equal on every rank), the ids of the
  dialogues it loaded, in order (sft.py, which reads them in-process with --workers 0), and torch's thread count
  at the first backward.
"""
import json
import os
import sys

import accelerate
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts
import mmduet2  # noqa: E402

backward, counts, seen = accelerate.Accelerator.backward, [], {}


def recorded(self, loss, **kwargs):
    backward(self, loss, **kwargs)
    seen["accelerator"] = self  # the one that trains: its model is this rank's, after the run too
    seen.setdefault("threads", torch.get_num_threads())
    grads = [p.grad for p in self._models[0].parameters() if p.requires_grad and p.grad is not None]
    counts.append(len({g.untyped_storage().data_ptr() for g in grads}))


def init_recorded(*args, **kwargs):
    timeouts.append(kwargs["timeout"].total_seconds() if "timeout" in kwargs else None)
    return init_process_group(*args, **kwargs)


def load_recorded(record, *args, **kwargs):
    examples.append(record.get("id"))
    return load_dialogue(record, *args, **kwargs)


accelerate.Accelerator.backward = recorded
init_process_group, timeouts = torch.distributed.init_process_group, []
torch.distributed.init_process_group = init_recorded
load_dialogue, examples = mmduet2.load_dialogue, []
mmduet2.load_dialogue = load_recorded
script, argv = sys.argv[1], sys.argv[2:]
__import__(script).main(argv)
out, rank = argv[argv.index("--out") + 1], accelerate.PartialState().process_index
json.dump(counts, open(os.path.join(out, f"grad-storages-rank{rank}.json"), "w"))
json.dump(timeouts, open(os.path.join(out, f"timeout-rank{rank}.json"), "w"))
model = seen["accelerator"].unwrap_model(seen["accelerator"]._models[0])
torch.save({"params": {n: p.detach().cpu() for n, p in model.named_parameters()}, "examples": examples,
            "threads": seen["threads"]},
           os.path.join(out, f"params-rank{rank}.pt"))
