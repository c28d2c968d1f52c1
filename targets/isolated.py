"""Timings of one runtime at a time: each measurement in a fresh process that exits before the next one starts.

Runtimes that share a process disturb each other's timings. onnxruntime's intra-op worker threads keep spinning after
a run (its default, which makes its own back-to-back calls faster), and on a 2-core machine they can take a core from
whatever runs next (benchmarks/spin_interference.py measures it; the effect is easily lost in a noisy machine's
variation). A study that compares runtimes therefore times each one here, in a process of its own; the process
exits, and its threads with it, before the next runtime is timed.

    measure_isolated(model, target, [(batch, repeats, warmup), ...], seed) -> [Timing, ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from arq_deploy.core.errors import ArqError
from arq_deploy.targets.bench import Timing, measure

#: batch-1 latency, then large-batch throughput (bench's defaults)
DEFAULT_PLAN = ((1, 50, 5), (256, 10, 1))


def measure_isolated(model: str | os.PathLike, target: str | None = None, plan=DEFAULT_PLAN,
                     seed: int = 0) -> list[Timing]:
    """`bench.measure` of an .onnx file (onnxruntime) or a compiled artifact directory (TVM) for each (batch,
    repeats, warmup) in plan, all in one fresh Python process; the calling process runs no runtime."""
    plan = [(int(b), int(r), int(w)) for b, r, w in plan]
    if not plan or any(b < 1 or r < 1 or w < 0 for b, r, w in plan):
        raise ArqError(f"a measurement plan is a non-empty list of (batch >= 1, repeats >= 1, warmup >= 0), "
                       f"got {plan}")
    job = json.dumps({"model": str(model), "target": target, "plan": plan, "seed": int(seed)})
    proc = subprocess.run([sys.executable, "-m", __name__, job], check=False, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ArqError(f"timing {model} in its own process failed: {why}")
    return [Timing(**r) for r in json.loads(lines[-1])]


def _main(job: str) -> int:
    from arq_deploy.targets.backends import open_runner

    spec = json.loads(job)
    try:
        runner, _ = open_runner(spec["model"], spec["target"])
        rows = [measure(runner, b, r, w, seed=spec["seed"]).to_dict() for b, r, w in spec["plan"]]
    except ArqError as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
