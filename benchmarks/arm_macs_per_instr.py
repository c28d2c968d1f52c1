"""Multiply-accumulates per instruction of the AArch64 integer conv kernels, read from the disassembly.

For each kernel (rpi4: `smlal` for 8-bit pairs, `smlal_narrow` for narrow pairs; rpi5: `sdot`), one 3×3 conv layer
(16 → 16 channels, 32×32, at batches 1, 2 and 8 (`--batches`), QDQ as the exporter writes it: b-bit activations
clipped in integers) is built
with `compile --integer`'s pipeline for the target, linked with the cross compiler and disassembled with
aarch64-linux-gnu-objdump. In the conv function, the innermost loop (a backward branch with no other loop inside it)
holding the most multiply lanes is the kernel's inner loop; MACs per instruction = multiply-accumulate lanes in it
(smull/smlal(2): the destination's lanes, 8 for .8h and 4 for .4s; sdot .4s: 16; mla/mul: the lanes) over all its
instructions (loads, broadcasts, address arithmetic and the branch included). The batch changes the schedule around
the kernel (one image or two: the pack stage runs before the conv; eight: inside its parallel loop), and with it how
LLVM unrolls and counts the reduction loop, so each batch is reported.

This is a static count (no board was used, and qemu says nothing about speed): an instruction-count ratio, not a
measured time; on a Cortex-A72 smlal .8h and .4s issue at the same rate, so the ratio is the expected speed-up of
the inner loop, before memory effects.

    python benchmarks/arm_macs_per_instr.py [--batches 1,2,8] [--out benchmarks/results/arm_macs_per_instr.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# (target, int_kernel, w_bits, a_bits): the layers measured
CASES = [("rpi4", "auto", 8, 8), ("rpi4", "smlal", 4, 4), ("rpi4", "auto", 6, 6), ("rpi4", "auto", 4, 4),
         ("rpi4", "auto", 2, 2), ("rpi4", "auto", 4, 8), ("rpi5", "auto", 8, 8), ("rpi5", "auto", 4, 4)]
MUL = re.compile(r"^(smlal2?|smull2?|umlal2?|umull2?|mla|mul|sdot|udot|usdot)$")
LANES = {"16b": 16, "8b": 8, "8h": 8, "4h": 4, "4s": 4, "2s": 2, "2d": 2}


def qdq_conv(w_bits: int, a_bits: int, cin: int = 16, cout: int = 16, hw: int = 32, seed: int = 0):
    """One QDQ conv layer (3×3, pad 1) with b-bit weights (int8 container, symmetric) and b-bit activations
    (uint8 QuantizeLinear, then the exporter's integer Clip to 2^a_bits − 1), ReLU, requantized to uint8."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    w_max = 2 ** (w_bits - 1) - 1
    w_q = rng.integers(-w_max, w_max + 1, (cout, cin, 3, 3)).astype(np.int8)
    s_w = (rng.random(cout) * 0.01 + 0.002).astype(np.float32)
    inits = [nh.from_array(np.float32(0.02), "sx"), nh.from_array(np.uint8(0), "zx"), nh.from_array(s_w, "sw"),
             nh.from_array(np.zeros(cout, np.int8), "zw"), nh.from_array(w_q, "wq"),
             nh.from_array(np.float32(0.05), "sy"), nh.from_array(np.uint8(0), "zy"),
             nh.from_array(np.uint8(0), "lo"), nh.from_array(np.uint8(2 ** a_bits - 1), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq8"])]
    if a_bits < 8:
        nodes.append(helper.make_node("Clip", ["xq8", "lo", "hi"], ["xq"]))
    nodes += [helper.make_node("DequantizeLinear", ["xq" if a_bits < 8 else "xq8", "sx", "zx"], ["xd"]),
              helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
              helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1] * 4),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, cout, hw, hw])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def disassemble(lib: Path, objdump: str = "aarch64-linux-gnu-objdump") -> dict[str, list[tuple[int, str, str]]]:
    """{function name: [(address, mnemonic, operands), ...]} of an AArch64 shared library."""
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, list] = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3).split("//")[0].strip()))
    return funcs


def mac_lanes(mnemonic: str, operands: str) -> int:
    """Multiply-accumulate lanes of one instruction (0 for anything but a vector multiply)."""
    if not MUL.match(mnemonic):
        return 0
    m = re.match(r"v\d+\.(\w+)", operands)
    if m is None:
        return 0  # scalar mul/madd: address arithmetic
    lanes = LANES.get(m.group(1), 0)
    return lanes * 4 if mnemonic in ("sdot", "udot", "usdot") else lanes


def inner_loops(insns: list[tuple[int, str, str]]) -> list[dict]:
    """Every innermost loop (a backward branch whose body holds no other backward branch): its instruction count,
    MAC lanes and the instructions by mnemonic."""
    loops = []
    addrs = [a for a, _, _ in insns]
    for i, (addr, mn, ops) in enumerate(insns):
        if not (mn.startswith("b.") or mn in ("b", "cbnz", "cbz", "tbnz", "tbz")):
            continue
        m = re.search(r"\b([0-9a-f]+) <", ops)
        target = int(m.group(1), 16) if m else None
        if target is None or target > addr or target < addrs[0]:
            continue
        loops.append((addrs.index(target) if target in addrs else None, i))
    out = []
    for start, end in loops:
        if start is None:
            continue
        if any(s2 is not None and start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in loops):
            continue  # holds a loop: not innermost
        body = insns[start:end + 1]
        counts: dict[str, int] = {}
        for _, mn, _ in body:
            counts[mn] = counts.get(mn, 0) + 1
        out.append({"instructions": len(body), "mac_lanes": sum(mac_lanes(mn, ops) for _, mn, ops in body),
                    "mnemonics": dict(sorted(counts.items(), key=lambda kv: -kv[1]))})
    return out


def measure(target: str, int_kernel: str, w_bits: int, a_bits: int, workdir: Path, batch: int = 2) -> dict:
    from tvm.relax.frontend.onnx import from_onnx

    from arq_deploy.targets.registry import get_target, resolve_tvm_target
    from arq_deploy.targets.tvm_build import build

    t = get_target(target)
    model = qdq_conv(w_bits, a_bits)
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    mod = from_onnx(model, shape_dict={"x": [batch, 16, 32, 32]}, keep_params_in_input=False)
    ex, info = build(mod, resolve_tvm_target(t), integer=True, int_kernel=int_kernel)
    lib = workdir / f"{target}-{int_kernel}-w{w_bits}a{a_bits}-b{batch}.so"
    ex.export_library(str(lib), cc=t.cross_compiler)
    layer = info["integer_lowering"]["conv2d_layers"][0]
    funcs = disassemble(lib)
    name = next(n for n in funcs if "arq_qconv" in n and n.endswith("_compute_"))
    loops = [lp for lp in inner_loops(funcs[name]) if lp["mac_lanes"] > 0]
    best = max(loops, key=lambda lp: lp["mac_lanes"])
    return {"target": target, "cpu": t.tvm_target.get("mcpu"), "int_kernel_option": int_kernel, "batch": batch,
            "w_bits": w_bits, "a_bits": a_bits, "kernel": layer["kernel"], "w_max": layer["w_max"],
            "a_max": layer["a_max"], "function": name, "inner_loop": best,
            "macs_per_instruction": round(best["mac_lanes"] / best["instructions"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2,8", help="images per call of the measured layer")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "arm_macs_per_instr.json"))
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("aarch64-linux-gnu-objdump") is None:
        print("needs the aarch64 cross toolchain: apt-get install gcc-aarch64-linux-gnu (or make aarch64-env)",
              file=sys.stderr)
        return 2
    from arq_deploy.core.host import host_info

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            for case in CASES:
                r = measure(*case, Path(tmp), batch=batch)
                rows.append(r)
                print(f"batch {batch} {r['target']:5s} {r['cpu']:11s} W{r['w_bits']}A{r['a_bits']} {r['kernel']:13s} "
                      f"{r['inner_loop']['mac_lanes']:4d} MACs / {r['inner_loop']['instructions']:3d} instructions = "
                      f"{r['macs_per_instruction']:.2f}")
    by = {(r["batch"], r["target"], r["int_kernel_option"], r["w_bits"], r["a_bits"]): r["macs_per_instruction"]
          for r in rows}
    ratios = {b: by[(b, "rpi4", "auto", 4, 4)] / by[(b, "rpi4", "auto", 8, 8)] for b in batches}
    rpi5 = {b: by[(b, "rpi5", "auto", 4, 4)] / by[(b, "rpi5", "auto", 8, 8)] for b in batches}
    result = {"what": "multiply-accumulate lanes per instruction in the innermost loop of each integer conv kernel, "
                      "counted in the cross-compiled library's disassembly (static; no board, no timing)",
              "layer": "3x3 conv, 16->16 channels, 32x32, b-bit symmetric weights, b-bit activations",
              "batches": batches, "host": host_info(), "rows": rows,
              "goal": {"rpi4_w4a4_over_w8a8": {str(b): round(v, 3) for b, v in ratios.items()}, "rpi4_target": 2.0,
                       "rpi4_met": all(v >= 2.0 for v in ratios.values()),
                       "rpi5_w4a4_over_w8a8": {str(b): round(v, 3) for b, v in rpi5.items()}, "rpi5_target": 1.3,
                       "rpi5_met": all(v >= 1.3 for v in rpi5.values())}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("rpi4 W4A4 / W8A8 MACs per instruction: " + ", ".join(f"batch {b} {v:.3f}x" for b, v in ratios.items())
          + f" (goal 2x) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
