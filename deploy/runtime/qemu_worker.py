"""The aarch64 side of `arq_deploy.runtime.qemu`: run by an aarch64 Python under qemu-user, with only TVM's runtime
and numpy importable (it imports nothing else of arq_deploy).

Protocol: one JSON request per line on stdin; one reply per line on stdout, prefixed with `@arq ` (anything else a
library prints goes to stderr). Requests:
    {"op": "load", "id": K, "path": LIB[, "params": P.npz]}   load a compiled library into a Relax VM under handle
        K; P.npz (arr_0, arr_1, ...): the tensors main takes after its input (external weights), kept on the device
    {"op": "run", "id": K, "in": X.npy, "out": Y.npy}   Y = main(X, *params); float32 N×C×H×W in, logits out
    {"op": "quit"}
Replies: {"ok": true, ...} or {"ok": false, "error": "Type: message"}. The first reply, sent once TVM is imported,
is {"ok": true, "ready": true, "machine": ..., "tvm": ..., "import_s": ...}.
"""

import json
import platform
import sys
import time


def _reply(stream, obj) -> None:
    stream.write("@arq " + json.dumps(obj) + "\n")
    stream.flush()


def _error(e: BaseException) -> dict:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return {"ok": False, "error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]}


def main() -> int:
    out, sys.stdout = sys.stdout, sys.stderr  # only protocol lines on the real stdout
    t0 = time.perf_counter()
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cpu()
    _reply(out, {"ok": True, "ready": True, "machine": platform.machine(), "tvm": tvm.__version__,
                 "numpy": np.__version__, "python": platform.python_version(),
                 "import_s": round(time.perf_counter() - t0, 2)})
    vms, mains, params = {}, {}, {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                _reply(out, {"ok": True})
                return 0
            if op == "load":
                vm = VirtualMachine(tvm.runtime.load_module(req["path"]), dev)
                vms[req["id"]], mains[req["id"]] = vm, vm["main"]
                params[req["id"]] = []
                if req.get("params"):
                    with np.load(req["params"]) as z:
                        params[req["id"]] = [tvm.runtime.tensor(z[f"arr_{i}"], dev) for i in range(len(z.files))]
                _reply(out, {"ok": True})
            elif op == "run":
                x = np.load(req["in"])
                t = time.perf_counter()
                y = mains[req["id"]](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), dev),
                                     *params[req["id"]]).numpy()
                seconds = time.perf_counter() - t
                np.save(req["out"], y)
                _reply(out, {"ok": True, "seconds": round(seconds, 4), "shape": list(y.shape)})
            else:
                _reply(out, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # report and keep serving
            _reply(out, _error(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
