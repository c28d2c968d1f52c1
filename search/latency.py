"""`arq-deploy latency-table`: per-layer latency of every (w, a) width pair on a target, for a latency budget.

For each quantizable layer l (Conv2d or Linear, from `extract_layer_specs`) of the BN-folded float model:

  1. a forward hook records l's input on `images` seeded uniform images in [0, 1] plus σ-noise; its shape (batch
     removed) becomes the input shape of a single-layer model (a Linear gets a C×1×1 input and a Flatten);
  2. for each pair (w, a), 2 <= w, a <= 8, the single-layer model is quantized (`quantize_model`), calibrated on the
     recorded inputs (`calibrate`) and exported to QDQ ONNX by the project's own path (`float_onnx` once per layer,
     then `insert_qdq` + `check` per pair, which is `export_qdq` without the metadata);
  3. pairs whose graphs are *structurally identical* (same nodes, attributes, tensor types and shapes; only values
     differ) run the same kernels on these backends, so they are measured once: one **variant** per structure.
     With this project's QDQ export that is three variants per layer: W8A8 (uint8 weights, no Clip), W<8A8 (int8
     weights, no Clip) and A<8 (int8 weights, a float Clip before QuantizeLinear), since every width 2..8 lives in
     an 8-bit container;
  4. each variant (and the float layer) is run at batch 1 by onnxruntime (`--backend onnxruntime`, this machine)
     or compiled with TVM for the target (`compile_onnx`, batch 1) and run here or on a device over TVM RPC
     (`--remote HOST:PORT`), timed with `arq_deploy.targets.bench.measure`: `warmup` untimed calls, then the **median** of
     `repeats` timed calls on one seeded uniform input.

The table (`LatencyTable` JSON) holds entries[l]["w{w}a{a}"] = median ms of the pair's variant, `source[l][pair]` =
the variant it came from, and `details`: each variant's statistics and pairs, the float layer's latency, the
per-call cost of a trivial layer (`overhead_ms`: every entry includes it once), and the whole model's measured
end-to-end latency (float, W8A8, W4A8, W4A4, exported the same way) next to the sum of its per-layer latencies, so
that a user sees how far from additive the cost model is (the sum leaves out ReLU, pooling, residual adds, and
counts the per-call overhead once per layer).
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

from arq_deploy.core.errors import ArqError, UnsupportedOpError
from arq_deploy.core.host import host_info, machine_arch
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.core.progress import progress_bar
from arq_deploy.export.qdq import check, float_onnx, insert_qdq, save_onnx
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.export.quantize.quant import calibrate, calibration_batches, fold_batchnorm, quantize_model
from arq_deploy.search.env import LatencyTable
from arq_deploy.targets.backends import open_runner
from arq_deploy.targets.bench import measure
from arq_deploy.targets.registry import get_target

BACKENDS = ("auto", "onnxruntime", "tvm", "tvm-int")
PAIRS = [(w, a) for w in range(2, 9) for a in range(2, 9)]
E2E_POLICIES = ((8, 8), (4, 8), (4, 4))


def pair_key(w: int, a: int) -> str:
    return f"w{w}a{a}"


# ------------------------------------------------------------------------------------------------ checks before work

def check_setup(target_name: str, backend: str = "auto", remote: str | None = None, int_kernel: str = "auto"):
    """(Target, backend) after every check that needs no model: ArqError with one line otherwise.

    Timing a cross-compiled (e.g. aarch64) build under qemu-user measures the emulator, not the device, so a target
    of another architecture needs --remote (TVM RPC to the board). A remote is checked to answer before any work."""

    t = get_target(target_name)  # UnknownNameError lists the targets
    if backend not in BACKENDS:
        raise ArqError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    native = t.host_arch == machine_arch()
    if backend == "auto":
        backend = "tvm" if remote or not native else "onnxruntime"
    if not native and not remote:
        raise ArqError(f"target {t.name!r} is {t.host_arch}, this machine is {machine_arch()}: timing it here under "
                       f"qemu would measure the emulator, not the device; run a TVM RPC server on the device and "
                       f"pass --remote HOST:PORT")
    if remote and backend not in ("tvm", "tvm-int"):
        raise ArqError("--remote runs TVM-compiled layers on the device: use --backend tvm or tvm-int (or leave it to "
                       "auto)")
    if backend == "tvm-int" and t.kind != "cpu":
        raise ArqError(f"--backend tvm-int: integer builds are implemented for CPU targets only, not {t.name!r}")
    if int_kernel != "auto" and backend != "tvm-int":
        raise ArqError("--int-kernel chooses the integer build's kernel: it needs --backend tvm-int")
    if backend == "tvm-int":
        from arq_deploy.targets.tvm_build import check_int_kernel

        check_int_kernel(int_kernel)
    if t.kind == "gpu" and not remote:
        from arq_deploy.runtime.runners import cuda_driver_present

        if not cuda_driver_present():
            raise ArqError(f"target {t.name!r} is a GPU and this machine has no NVIDIA driver: measure on the "
                           f"device (--remote HOST:PORT) or on a machine with that GPU")
    if remote:
        from arq_deploy.runtime.rpc_runner import check_reachable

        check_reachable(remote)
    return t, backend


# ------------------------------------------------------------------------------------------------ single-layer models

def layer_inputs(model, input_shape, names, images: int = 32, sigma: float = 0.0, seed: int = 0) -> dict:
    """{layer name: its input (torch tensor, images×...)} on seeded uniform images in [0, 1] (+ σ-noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand((images, *input_shape), generator=g)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=g)
    got, hooks = {}, []

    def hook(name):
        def record(mod, inp, out):  # returns None: a hook's return value would replace the layer's output
            got.setdefault(name, inp[0].detach())
        return record

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in got]
    if missing:
        raise UnsupportedOpError(f"layer(s) {missing[:3]} did not run in a forward pass of the model")
    return got


def single_layer(module, x):
    """(torch model holding a copy of `module` as submodule 'layer', its C×H×W input shape, its input batch)."""
    import torch.nn as nn

    layer = copy.deepcopy(module).eval()
    if isinstance(layer, nn.Conv2d) and x.dim() == 4:
        return nn.Sequential(), tuple(x.shape[1:]), x, layer
    if isinstance(layer, nn.Linear) and x.dim() == 2:
        return nn.Sequential(nn.Flatten()), (int(x.shape[1]), 1, 1), x.reshape(len(x), -1, 1, 1), layer
    raise UnsupportedOpError(f"a {type(layer).__name__} with a {tuple(x.shape[1:])} input: the latency table "
                             "measures Conv2d layers on N×C×H×W inputs and Linear layers on N×F inputs")


def _wrap(prefix, layer):
    import torch.nn as nn

    m = nn.Sequential()
    for i, sub in enumerate(prefix):
        m.add_module(f"pre{i}", sub)
    m.add_module("layer", layer)
    return m.eval()


def graph_signature(model) -> str:
    """sha256 of an ONNX graph's structure: nodes (op, domain, attributes, wiring), tensor types and shapes of
    initializers, inputs and outputs; initializer *values* are left out. Equal signatures run the same kernels."""
    from onnx import helper

    g, parts = model.graph, []
    for n in g.node:
        attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)
        parts.append(("node", n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(attrs)))
    for t in g.initializer:
        parts.append(("init", t.name, t.data_type, tuple(t.dims)))
    for v in (*g.input, *g.output):
        parts.append(("io", v.name, str(v.type)))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def variant_label(model) -> str:
    """A readable name of a QDQ layer graph's structure: weight container type and whether a Clip precedes Q."""
    from onnx import TensorProto

    wq = [t for t in model.graph.initializer if t.name.endswith(".weight_q")]
    wtype = TensorProto.DataType.Name(wq[0].data_type).lower() if wq else "float"
    clip = any(n.op_type == "Clip" for n in model.graph.node)
    return f"{wtype}-weights{'+clip' if clip else ''}"


def quantized_layer_graphs(prefix, layer, x, float_graph) -> dict:
    """{(w, a): (QDQ ONNX ModelProto, signature)} for every pair, calibrated on the layer's recorded inputs x."""

    model = _wrap(prefix, layer)
    shape = tuple(x.shape[1:])
    specs = extract_layer_specs(model, shape)
    out = {}
    for w, a in PAIRS:
        q = quantize_model(model, QuantPolicy.for_layers(["layer"], [(w, a)]), specs, fold_bn=False)
        calibrate(q, [x])
        g = insert_qdq(copy.deepcopy(float_graph), q)
        check(g)
        out[(w, a)] = (g, graph_signature(g))
    return out


# ------------------------------------------------------------------------------------------------ timing one graph

class Timer:
    """Times ONNX graphs on one target/backend with `arq_deploy.targets.bench.measure` (batch 1, median of `repeats`).

    backend "tvm-int": TVM integer builds with `int_kernel`; `plan(graph)` then names the code such a build runs
    (per conv layer its kernel and narrow chunk, `tvm_build.integer_plan`), which the graph's structure alone does not
    tell: every width 2..8 has the same QDQ structure, but the kernel and its int16 chunk follow the (w, a) pair."""

    def __init__(self, target, backend: str, remote: str | None, repeats: int, warmup: int, seed: int, workdir,
                 int_kernel: str = "auto"):
        self.target, self.backend, self.remote = target, backend, remote
        self.repeats, self.warmup, self.seed = repeats, warmup, seed
        self.int_kernel = int_kernel
        self.workdir = Path(workdir)
        self.count = 0

    def plan(self, graph) -> tuple[str, str]:
        """(key, label) of the code a build of this graph runs beyond its structure: ("", "") except for tvm-int."""
        if self.backend != "tvm-int":
            return "", ""
        from arq_deploy.targets.tvm_build import integer_plan

        report = integer_plan(graph, self.target, batch_size=1, int_kernel=self.int_kernel)
        layers = [(c["kernel"] or "int-conv2d", c["chunk"]) for c in report["conv2d_layers"]]
        label = ",".join(k if c is None else f"{k}/chunk{c}" for k, c in layers) or "int-matmul"
        return json.dumps([layers, report["matmul"], report["requantized"]]), label

    def __call__(self, graph) -> dict:

        self.count += 1
        path = self.workdir / f"g{self.count}.onnx"
        save_onnx(graph, path)
        if self.backend in ("tvm", "tvm-int"):
            from arq_deploy.targets.backends import compile_onnx

            extra = {"integer": True, "int_kernel": self.int_kernel} if self.backend == "tvm-int" else {}
            path = compile_onnx(path, self.target, self.workdir / f"a{self.count}", batch_size=1, single=False,
                                **extra)
        runner, _ = open_runner(path, self.target.name, self.remote)
        try:
            t = measure(runner, 1, self.repeats, self.warmup, self.seed)
        finally:
            if hasattr(runner, "close"):
                runner.close()
        return {"ms": t.p50_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms}


def trivial_graph():
    """A 1×1 conv on a 1×1×1 input: its latency is the per-call cost of the runner (overhead_ms)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["logits4"])
    flat = helper.make_node("Flatten", ["logits4"], ["logits"])
    g = helper.make_graph([node, flat], "trivial", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  ["N", 1, 1, 1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ------------------------------------------------------------------------------------------------ the table

def measure_table(lm, target_name: str, backend: str = "auto", remote: str | None = None, *, repeats: int = 50,
                  warmup: int = 5, seed: int = 0, sigma: float = 0.0, end_to_end: bool = True,
                  progress: bool = True, int_kernel: str = "auto"):
    """The `LatencyTable` of model `lm` (a `LoadedModel`) on a target (see the module docstring)."""

    for what, v, lo in (("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if v < lo:
            raise ArqError(f"{what} must be >= {lo}, got {v}")
    target, backend = check_setup(target_name, backend, remote, int_kernel)
    specs = extract_layer_specs(lm.model, lm.input_shape)
    if not specs:
        raise ArqError(f"model {lm.name!r} has no quantizable layers (Conv2d or Linear)")
    folded = fold_batchnorm(lm.model)
    inputs = layer_inputs(folded, lm.input_shape, [s.name for s in specs], sigma=sigma, seed=seed)
    entries, source, variants, float_ms, shapes = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="arq-latency-") as tmp, \
            progress_bar("latency", len(specs) + (1 + len(E2E_POLICIES) if end_to_end else 0), progress) as (bar, task):
        timer = Timer(target, backend, remote, repeats, warmup, seed, tmp, int_kernel)
        overhead = timer(trivial_graph())["ms"]
        for s in specs:
            bar.update(task, info=s.name)
            prefix, shape, x, layer = single_layer(folded.get_submodule(s.name), inputs[s.name])
            shapes[s.name] = list(shape)
            fgraph = float_onnx(_wrap(prefix, layer), shape)
            float_ms[s.name] = timer(fgraph)
            entries[s.name], source[s.name], variants[s.name] = _measure_layer(
                quantized_layer_graphs(prefix, layer, x, fgraph), timer)
            bar.update(task, advance=1)
        e2e = _end_to_end(lm, folded, entries, float_ms, timer, sigma, seed, bar, task) if end_to_end else None
    details = {
        "backend": backend, "int_kernel": int_kernel if backend == "tvm-int" else None, "remote": remote, "batch": 1,
        "statistic": "median of repeats (ms)",
        "repeats": repeats, "warmup": warmup, "seed": seed, "calibration_sigma": sigma,
        "input_shape": list(lm.input_shape), "layer_input_shapes": shapes, "overhead_ms": overhead,
        "variants": variants, "float_ms": {n: v["ms"] for n, v in float_ms.items()}, "end_to_end": e2e,
        "host": host_info() | {"node": platform.node()}, "measured": timer.count,
    }
    return LatencyTable(target.name, lm.name, entries, source=source, details=details)


def _measure_layer(graphs: dict, timer) -> tuple[dict, dict, dict]:
    """(entries, source, variants) of one layer: one measurement per distinct graph signature and build plan."""
    by_sig: dict[tuple[str, str], list] = {}
    labels: dict[tuple[str, str], str] = {}
    for pair, (g, sig) in graphs.items():
        key, plan_label = timer.plan(g)
        by_sig.setdefault((sig, key), []).append(pair)
        labels[(sig, key)] = plan_label
    entries, source, variants = {}, {}, {}
    for (sig, key), pairs in by_sig.items():
        rep = max(pairs)  # the widest pair stands for its variant
        g = graphs[rep][0]
        label = variant_label(g) + (f"|{labels[(sig, key)]}" if labels[(sig, key)] else "")
        if label in variants:
            label = f"{label}#{sig[:6]}"
        stats = timer(g)
        variants[label] = stats | {"signature": sig, "measured_as": pair_key(*rep),
                                   "pairs": [pair_key(*p) for p in sorted(pairs)]}
        for p in pairs:
            entries[pair_key(*p)] = stats["ms"]
            source[pair_key(*p)] = label
    order = [pair_key(*p) for p in PAIRS]
    return ({k: entries[k] for k in order}, {k: source[k] for k in order}, variants)


def _end_to_end(lm, folded, entries, float_ms, timer, sigma, seed, bar, task) -> dict:
    """The whole model measured end to end (float and uniform policies) next to the sum of its layers' entries."""
    import torch

    specs = extract_layer_specs(lm.model, lm.input_shape)
    fgraph = float_onnx(folded, lm.input_shape)
    bar.update(task, info="end to end")
    out = {"float": {"measured_ms": timer(fgraph)["ms"], "sum_of_layers_ms": sum(v["ms"] for v in float_ms.values())}}
    bar.update(task, advance=1)
    x = torch.rand((64, *lm.input_shape), generator=torch.Generator().manual_seed(seed))
    for w, a in E2E_POLICIES:
        q = quantize_model(lm.model, QuantPolicy.uniform(w, a), specs)
        calibrate(q, calibration_batches(x, sigma, seed=seed))
        g = insert_qdq(copy.deepcopy(fgraph), q)
        check(g)
        key = pair_key(w, a)
        out[key] = {"measured_ms": timer(g)["ms"], "sum_of_layers_ms": sum(e[key] for e in entries.values())}
        bar.update(task, advance=1)
    for v in out.values():
        v["sum_over_measured"] = v["sum_of_layers_ms"] / v["measured_ms"]
    return out
