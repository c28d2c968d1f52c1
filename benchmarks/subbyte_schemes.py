"""Which arithmetic could make a sub-8-bit conv kernel faster on this CPU? Throughput of each candidate scheme.

Compiles `subbyte_schemes.c` (gcc -O2; AVX2 and, where the CPU has them, AVX-512 VNNI + VPOPCNTDQ functions,
dispatched at run time), runs it `--rounds` times and keeps, per scheme, the fastest round's nanoseconds per inner-loop
step. Each step runs on independent register accumulators, so it prices the instructions' throughput, not a kernel:
no loads, no packing, no epilogue. Reported per scheme: useful multiply-accumulates (MACs) per nanosecond and the ratio
to the ISA's exact 8-bit kernel measured in the same run (AVX-512 VNNI: `vpdpbusd`; AVX2: `vpmaddwd`), i.e. the
most a whole model could gain from that scheme if its convolutions were all arithmetic and filled every lane.

    python benchmarks/subbyte_schemes.py [--rounds 7] [--steps 20000000] [--out benchmarks/results/subbyte_schemes.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = {"avx512": "vpdpbusd_u8s8", "avx2": "vpmaddwd_i16"}
# which (w, a) pairs each scheme computes exactly, as the kernel would use it
PAIRS = {"vpdpbusd_u8s8": "any w, a <= 8", "vpmaddubsw_i16": "narrow pairs (int16 sums bounded per chunk)",
         "vpmaddwd_i16": "any w, a <= 8 (8-bit x 8-bit)", "ulppack_vpmaddwd": "w, a <= 4 (2 values per 16-bit field)",
         "bitserial_w1a1": "w = a = 1 bit", "bitserial_w2a2": "w, a <= 2 bits (4 bit-plane pairs)",
         "lut_w2a2": "w <= 2 bits, a <= 2 bits (sums of 4 activations in int8 tables)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20_000_000)
    ap.add_argument("--out", default=str(HERE / "results" / "subbyte_schemes.json"))
    args = ap.parse_args(argv)
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("error: no C compiler (gcc) on PATH")

    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info

    with tempfile.TemporaryDirectory(prefix="arq-schemes-") as d:
        exe = Path(d) / "schemes"
        subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "subbyte_schemes.c")], check=True)
        rounds = []
        for r in range(args.rounds):
            out = subprocess.run([str(exe), str(args.steps)], check=True, capture_output=True, text=True).stdout
            rounds.append([json.loads(line) for line in out.splitlines() if line.strip()])
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    best: dict[tuple[str, str], dict] = {}
    for row in (x for rnd in rounds for x in rnd):
        key = (row["isa"], row["scheme"])
        if key not in best or row["ns_per_step"] < best[key]["ns_per_step"]:
            best[key] = row
    table = {}
    for (isa, scheme), row in best.items():
        base = best.get((isa, BASELINE[isa]))
        rate = row["macs_per_step"] / row["ns_per_step"]
        table.setdefault(isa, {})[scheme] = {
            "macs_per_step": row["macs_per_step"], "ns_per_step": row["ns_per_step"], "macs_per_ns": rate,
            "vs_8bit_kernel": rate / (base["macs_per_step"] / base["ns_per_step"]) if base else None,
            "pairs": PAIRS[scheme],
            "ns_per_step_rounds": [x["ns_per_step"] for rnd in rounds for x in rnd
                                   if (x["isa"], x["scheme"]) == (isa, scheme)]}
    for isa, rows in table.items():
        print(f"\n{isa} (8-bit kernel: {BASELINE[isa]})")
        print(f"  {'scheme':18s} {'MACs/step':>9s} {'ns/step':>8s} {'MACs/ns':>8s} {'vs 8-bit':>8s}  pairs")
        for scheme, r in rows.items():
            print(f"  {scheme:18s} {r['macs_per_step']:9d} {r['ns_per_step']:8.3f} {r['macs_per_ns']:8.1f} "
                  f"{r['vs_8bit_kernel']:7.2f}x  {r['pairs']}")
    write_json(args.out, {
        "study": "throughput of sub-8-bit multiply-accumulate schemes (register-resident inner-loop steps)",
        "source": "benchmarks/subbyte_schemes.c", "compiler": cc, "rounds": args.rounds, "steps": args.steps,
        "aggregation": "per scheme the fastest round (ns per step); ratios against the ISA's 8-bit kernel",
        "baseline": BASELINE, "schemes": table, "host": host_info()})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
