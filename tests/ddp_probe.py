"""Run by the tests under `accelerate launch` (2 gloo ranks): `python tests/ddp_probe.py sft|grpo FLAGS...` runs that
script's main and records, after every backward, how many storages the trained parameters' gradients live in.

With DDP's gradient_as_bucket_view they are views into a few all-reduce buckets, one storage per bucket. A gradient
that was None when a no_sync micro-batch ran is allocated afresh, one storage per parameter: a second copy of every
gradient beside the buckets. The counts go to OUT/grad-storages-rankR.json.
"""
import json
import os
import sys

import accelerate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts
backward, counts = accelerate.Accelerator.backward, []


def recorded(self, loss, **kwargs):
    backward(self, loss, **kwargs)
    grads = [p.grad for p in self._models[0].parameters() if p.requires_grad and p.grad is not None]
    counts.append(len({g.untyped_storage().data_ptr() for g in grads}))


accelerate.Accelerator.backward = recorded
script, argv = sys.argv[1], sys.argv[2:]
__import__(script).main(argv)
out, rank = argv[argv.index("--out") + 1], accelerate.PartialState().process_index
json.dump(counts, open(os.path.join(out, f"grad-storages-rank{rank}.json"), "w"))
