"""The replica check: every rank hashes its parameters and the hashes are compared across ranks,
so data-parallel replicas that fork (a launcher that set up no process group, an uneven skip, a
non-deterministic op on one rank) fail the run at the step where it was seen, not after it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import numpy as np
import torch
from accelerate import Accelerator

from eatdist.errors import EatdistError
from eatdist.train.scale import gathered, zero_stage

# Test hook, read only here: ``EATDIST_TEST_DIVERGE_RANK=R`` makes rank R nudge one of its
# weights after its first optimizer update, so tests can prove that a fork is caught.
DIVERGE_ENV = "EATDIST_TEST_DIVERGE_RANK"


class ReplicaError(EatdistError):
    """The ranks of a data-parallel run hold different parameters."""


def parameter_digest(model: torch.nn.Module) -> str:
    """Return a SHA-256 over every parameter's values (as float32), in name order.

    Equal digests mean equal parameters; run it inside :func:`gathered` under ZeRO-3.
    Buffers (BatchNorm statistics) are left out: each rank updates them from its own batches.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas(model: torch.nn.Module, acc: Accelerator, step: int) -> str:
    """Compare the parameter digest of every rank; return it (the same on every rank).

    One all-gather of 32 bytes per rank. Under ZeRO-1/2 each rank holds the whole updated model,
    so the digests are compared as under DDP; under ZeRO-3 each parameter shard lives on one
    rank only and the digest is of the model gathered from the shards. A collective: call it on
    every rank.

    Raises:
        ReplicaError: on every rank, naming the ranks whose parameters differ and the step.
    """
    with gathered(model, acc):
        digest = parameter_digest(model)
    if acc.num_processes == 1:
        return digest
    words = np.frombuffer(bytes.fromhex(digest), dtype=np.int64).copy()
    everyone = acc.gather(torch.from_numpy(words).to(acc.device)).view(acc.num_processes, -1).cpu().numpy()
    digests = [row.tobytes().hex() for row in everyone]
    counts = Counter(digests)
    if len(counts) == 1:
        return digest
    # The digest most ranks share is the model; ties go to rank 0's.
    common = max(counts, key=lambda d: (counts[d], d == digests[0]))
    forked = [r for r, d in enumerate(digests) if d != common]
    reference = digests.index(common)
    names = ", ".join(map(str, forked))
    zero = f", ZeRO-{zero_stage(acc)}" if zero_stage(acc) else ""
    raise ReplicaError(
        f"replicas diverged at step {step}: the parameters of rank{'s' if len(forked) > 1 else ''} {names} differ "
        f"from rank {reference}'s ({len(counts)} different digests over {acc.num_processes} ranks{zero}); "
        "the ranks are not training one model (see docs/launchers.md)"
    )


def diverge_for_test(model: torch.nn.Module, acc: Accelerator) -> None:
    """Nudge one weight of this rank when :data:`DIVERGE_ENV` names it (tests only)."""
    if os.environ.get(DIVERGE_ENV) != str(acc.process_index):
        return
    with torch.no_grad():
        weight = next(p for p in model.parameters() if p.numel())
        weight.view(-1)[0] += 1e-3
