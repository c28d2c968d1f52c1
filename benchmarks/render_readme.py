"""Print the Markdown tables of benchmarks/README.md from the JSON files in benchmarks/results/.

    python benchmarks/render_readme.py            # every table
    python benchmarks/render_readme.py arq irs    # only the sections whose name contains one of these words

Standard library only (no project imports), so it runs without the venv. Each table is preceded by the file it
was read from and by what that file records about the machine.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def n0(x) -> str:
    return f"{x:,.0f}"


def f2(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def f3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def ratio(x) -> str:
    return f"{x:.2f}×"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def cert(ca: dict, radii=("0", "0.25", "0.5")) -> str:
    return " / ".join(f"{100 * ca[r]:.0f}" for r in radii) + " %"


def rounded(obj, digits: int = 3):
    """A JSON value with every float rounded (for evidence printed inline)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def source(name: str, machine: str) -> str:
    return f"`benchmarks/results/{name}` ({machine})"


# ------------------------------------------------------------------------------------------------------- sections
def tvm_int8() -> str:
    out = []
    labels = {"ort_w8a8": "onnxruntime, our W8A8 export (u8 × u8 weights)", "ort_fp32": "onnxruntime fp32",
              "ort_quantize_static_int8": "onnxruntime `quantize_static` int8 (its own u8 × s8 model)",
              "tvm_float": "TVM float build", "tvm_int": "TVM integer build (`compile --integer`)",
              "tvm_int_vpmaddwd": "TVM integer build, `--int-kernel vpmaddwd`",
              "tvm_float_tuned": "TVM float build, MetaSchedule 48 trials",
              "tvm_int_tuned": "TVM integer build, MetaSchedule 48 trials"}
    for name in ("tvm_int8_bench.json", "tvm_int8_bench_tuned.json"):
        d = load(name)
        m = d["machine"]
        mach = f"CPU {m['cpu']}, {m['cores']} cores"
        if m.get("simd"):
            mach += ", flags " + ", ".join(m["simd"])
        if d.get("int_kernel"):
            mach += f"; integer kernel {d['int_kernel']}"
        mach += f"; load average before {d['load_average']['before'][0]}"
        ips, agree = d["images_per_s"], d["top1_agreement_with_ort_w8a8"]
        rows = [[labels.get(k, k), n0(v), ratio(v / ips["tvm_float"]), pct(agree.get(k))] for k, v in ips.items()]
        out.append(source(name, mach) + f", {d['model']}, batch {d['batch']}, {d['rounds']} interleaved rounds:\n\n"
                   + table(["path", "img/s", "vs TVM float", f"top-1 agreement with onnxruntime W8A8 "
                            f"({d['agreement_images']:,} images)"], rows))
    return "\n\n".join(out)


def runtime() -> str:
    d = load("runtime_bench.json")
    rows = [[k, n0(v), ratio(d["ratio_vs_torch_eager"][k])] for k, v in d["samples_per_s"].items()]
    return (source("runtime_bench.json", f"{d['machine']}, {d['cores']} cores") +
            f", {d['model']}, σ = {d['sigma']}, batch {d['batch']}, {d['samples']:,} samples, best of "
            f"{d['repeats']}:\n\n" + table(["path", "samples/s", "vs torch eager"], rows))


def certify() -> str:
    d = load("certify_bench.json")
    w8 = d["ratio_vs_w8a8_reference"]
    rows = [[k, n0(v), ratio(d["ratio_vs_reference"][k]), ratio(w8[k]) if k in w8 else "–"]
            for k, v in d["samples_per_s"].items()]
    c = d["certify"]
    radii = list(c["certified_accuracy"])
    text = (source("certify_bench.json", f"{d['machine']}, {d['cores']} cores, torch threads {d['torch_threads']}")
            + f", {d['model']}, σ = {d['sigma']}, {d['samples_per_round']:,} samples per round, best of "
            f"{d['repeats']}:\n\n" + table(["path", "samples/s", "vs fp32 reference", "vs W8A8 reference"], rows))
    text += (f"\n\nCertification with `{c['path']}`: {c['images']} test images (every {c['step']}th), "
             f"N0 = {c['n0']}, N = {c['n']:,}, α = {c['alpha']}: {c['seconds_per_image']:.2f} s per image "
             f"(the fp32 reference loop, estimated: {c['reference_seconds_estimate'] / c['images']:.1f} s); "
             f"certified accuracy at r = {' / '.join(radii)}: "
             f"{' / '.join(str(round(100 * c['certified_accuracy'][r])) for r in radii)} %, ACR {c['acr']:.3f}, "
             f"abstain {100 * c['abstain_rate']:.0f}%.")
    rows = []
    for name in ("certify_bench.json", "certify_bench_fp32_run1.json", "certify_bench_fp32_run2.json"):
        e = load(name)
        r = e["ratio_vs_reference"]
        fp32 = {k: v for k, v in r.items() if k.startswith("ORT fp32") and "RandomNormal" not in k}
        with_rw = max((k for k in fp32 if "no shortcut rewrite" not in k), key=fp32.get)
        without = max((k for k in fp32 if "no shortcut rewrite" in k), key=fp32.get)
        ref = next(v for k, v in e["samples_per_s"].items() if k.startswith("reference: torch eager fp32"))
        rows.append([f"`{name}`", n0(ref), f"{with_rw}: {ratio(fp32[with_rw])}", f"{without}: {ratio(fp32[without])}"])
    text += "\n\nThe fp32 onnxruntime paths in three runs (seeded noise in every row; the in-graph RandomNormal row, " \
            "which is not reproducible, left out):\n\n" + table(
                ["file", "reference samples/s", "best fp32 path (vs reference)", "best without the shortcut rewrite"],
                rows)
    return text


def _host(h: dict) -> str:
    flags = ", ".join(h.get("isa_flags") or []) or "no ISA flags recorded"
    return f"{h.get('cpu_model') or 'CPU model not recorded'}, {h['cpus']} CPUs ({flags}), load {h['load_average']}"


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / max(values)


def bops() -> str:
    d = load("bops_vs_latency.json")
    fp = next(m for m in d["models"] if m["name"] == "fp32")
    peer = d["peer"]["onnxruntime"]
    backends = ("onnxruntime", "tvm-int", "tvm-int-avx2")
    rows = []
    for m in d["models"]:
        st = m.get("tvm-int-storage") or {}
        packed = st.get("weights_packed_bytes")
        rows.append([m["name"], f"{100 * m['bops_fraction']:.2f}"]
                    + [f"{n0(m[b]['images_per_s'])} ({m[b]['images_per_s'] / fp[b]['images_per_s']:.2f}×)"
                       for b in backends]
                    + [" / ".join(f"{m[b]['latency_p50_ms']:.2f}" for b in backends),
                       "–" if packed is None else f"{packed / 1e3:.1f}"])
    rows.append([d["peer"]["name"], f"{100 * d['peer']['bops_fraction']:.2f}", n0(peer["images_per_s"]), "", "",
                 f"{peer['latency_p50_ms']:.2f}", ""])
    text = (source("bops_vs_latency.json", _host(d["host"])) + f", ResNet-20 gauss0.25, σ = {d['sigma']}, "
            f"batch {d['batch_large']}, {d['rounds']} interleaved rounds"
            + (f" ({d['isolation']})" if "isolation" in d else "") + f", {d['aggregation']}:\n\n" +
            table(["policy", "BOPs %", "onnxruntime img/s (vs fp32)", "TVM integer x86 img/s (vs TVM fp32)",
                   "TVM integer x86-avx2 img/s (vs TVM fp32)",
                   "p50 ms at batch 1: onnxruntime / x86 / x86-avx2", "x86 weights kB (packed)"], rows))
    rows = []
    for b, c in d["spearman"].items():
        rows.append([b] + [f"{c[k]['rho']:+.2f} (p = {c[k]['p_value']:.2f}, n = {c[k]['n']})"
                           for k in ("per_image_quantized", "latency_quantized")])
    text += "\n\nSpearman's ρ between BOPs and time over the quantized policies:\n\n" + table(
        ["backend", "ρ, ms per image at the large batch", "ρ, p50 latency at batch 1"], rows)
    rows = []
    for b, g in d["goals"].items():
        rows.append([b, ratio(g["W4A4_over_W8A8_throughput"]), ratio(g["W2A2_over_W8A8_throughput"]),
                     ratio(g["W8A8_over_peer_throughput"]), ratio(g["W8A8_over_peer_batch1_speedup"]),
                     ", ".join(g["sub8_behind_peer_throughput"]) or "none"])
    spread = statistics.median(_spread(r["images_per_s_rounds"]) for r in
                               [m[b] for m in d["models"] for b in backends] + [peer])
    text += ("\n\nNoise: the median over (model, backend) of the spread of throughput between rounds, "
             f"(best − worst) / best, is {100 * spread:.0f}%.")
    text += "\n\nThe kernel goals, from the same run:\n\n" + table(
        ["build", "W4A4 / W8A8 throughput", "W2A2 / W8A8 throughput", "W8A8 / peer throughput",
         "W8A8 / peer batch-1 speed", "sub-8-bit policies at or below the peer's throughput"], rows)
    return text


def schemes() -> str:
    d = load("subbyte_schemes.json")
    rows = []
    for isa, table_ in d["schemes"].items():
        for scheme, r in table_.items():
            rows.append([isa, scheme, r["macs_per_step"], f"{r['ns_per_step']:.3f}", f"{r['macs_per_ns']:.0f}",
                         ratio(r["vs_8bit_kernel"]), r["pairs"]])
    return (source("subbyte_schemes.json", _host(d["host"])) + f", {d['rounds']} rounds of {d['steps']:,} steps, "
            f"{d['aggregation']}:\n\n" +
            table(["ISA", "scheme", "MACs per step", "ns per step", "MACs per ns", "vs the ISA's 8-bit kernel",
                   "exact for"], rows))


ARQ_ROWS = ["FP32", "W8A8", "W4A4", "best uniform (W3A3)", "HAQ", "random", "greedy", "ARQ"]


def _arq_rows(t: dict) -> list[list]:
    rows = []
    for name in [r for r in ARQ_ROWS if r in t] + [r for r in t if r not in ARQ_ROWS]:
        r = t[name]
        rr = r.get("rerank")
        rows.append([name, f"{r['bops_percent']:.2f}", f2(r["clean"]), f2(r["cert_0.25"]), f2(r["cert_0.5"]),
                     f2(r["cert_0.75"]), f3(r["acr"]), n0(r["search_seconds"]) if "search_seconds" in r else "–",
                     r.get("evaluations", "–"), rr["chosen_episode"] if rr else "–", r["certify_runtime"]])
    return rows


def arq() -> str:
    out = []
    hdr = ["row", "BOPs %", "clean", "r = 0.25", "r = 0.5", "r = 0.75", "ACR", "search s", "distinct policies",
           "re-ranked: kept episode", "certified by"]
    for name in ("arq_table.json", "arq_table_rerank_sigma025.json"):
        d = load(name)
        s = d["settings"]
        out.append(source(name, d["machine"]) + f"; {d['wall_seconds'] / 60:.0f} min in all; budget "
                   f"{100 * s['budget']:.1f}% BOPs, {s['episodes']} episodes ({s['warmup']} warm-up), rewards on "
                   f"{s['val_images']} training images, fine-tuning {s['finetune_epochs']} epochs at LR "
                   f"{s['finetune_lr']}, re-ranking {s.get('rerank_top', 0) or 'off'}, certified on "
                   f"{s['test_images']} test images at N = {s['test_n']:,}:")
        for sg, v in d["sigmas"].items():
            out.append(f"σ = {sg}:\n\n" + table(hdr, _arq_rows(v["table"])))
        rows = []
        for sg, v in d["sigmas"].items():
            c = v["irs_vs_full"]
            rows.append([sg, f"{c['irs_seconds_per_reward']:.1f}", f"{c['full_seconds_per_reward']:.1f}",
                         f"{c['irs_samples_per_reward']:,.0f} / {c['full_samples_per_reward']:,.0f}",
                         ratio(c["time_ratio_full_over_irs"]), n0(c["arq_search_seconds"]),
                         n0(c["arq_search_seconds_with_full_reward_estimate"]), n0(c["float_cache_seconds"])])
        out.append("Cost of a reward, IRS against full certification (same inputs, "
                   f"{d['sigmas'][next(iter(d['sigmas']))]['irs_vs_full']['episodes_compared']} episodes compared):\n\n"
                   + table(["σ", "IRS s/reward", "full s/reward", "quantized-network evaluations IRS / full",
                            "full ÷ IRS time", "ARQ search s", "the same with full rewards (estimate)",
                            "float cache s"], rows))
    return "\n\n".join(out)


def paired() -> str:
    name = "arq_table_sigma025_paired.json"
    d = load(name)
    s = d["settings"]
    out = [source(name, d["machine"]) + f"; rows {s['rows']}, {s['test_images']} test images at N = "
           f"{s['test_n']:,}, re-ranking top {s['rerank_top']} on {s['rerank_images']} images:"]
    for sg, v in d["sigmas"].items():
        p = v["paired_vs_arq"]
        rows = []
        for name_, r in v["table"].items():
            q = p.get(name_)
            rows.append([name_, f"{r['bops_percent']:.2f}", f3(r["clean"]), f3(r["cert_0.25"]), f3(r["cert_0.5"]),
                         f3(r["cert_0.75"]), f3(r["acr"]),
                         f"{q['acr_difference']:+.3f} ({q['ci95'][0]:+.3f} … {q['ci95'][1]:+.3f})" if q else "–",
                         f"{q['p_other_higher']:.2f}" if q else "–",
                         f"{q['ours_ahead_on']} / {q['other_ahead_on']}" if q else "–"])
        out.append(f"σ = {sg}:\n\n" + table(["row", "BOPs %", "clean", "r = 0.25", "r = 0.5", "r = 0.75", "ACR",
                                              "ARQ − row, paired (95% CI)", "p (row higher)",
                                              "images ARQ ahead / behind"], rows))
    return "\n\n".join(out)


def irs() -> str:
    out = []
    d = load("irs_bench.json")
    rows = []
    for sg, v in d["sigmas"].items():
        for mname in ("W8A8", "mixed"):
            m = v[mname]
            rows.append([sg, f"{mname} ({100 * m['bops_fraction']:.2f}% BOPs)", f"{m['full']['s_per_image']:.2f}",
                         f"{m['irs']['s_per_image']:.2f}", ratio(m["speedup"]),
                         f"{100 * m['full']['certified_accuracy']['0']:.0f}% / "
                         f"{100 * m['irs']['certified_accuracy']['0']:.0f}%",
                         f"{m['full']['acr']:.3f} / {m['irs']['acr']:.3f}", pct(m["irs"]["cost"]["irs_fraction"])])
    out.append(source("irs_bench.json", f"{d['runtime']}; no machine recorded") +
               f", {d['images']} test images, N0 = {d['n0']}, N = {d['n']:,}, n_p = {d['n_p']:,}, α = α_ζ = "
               f"{d['alpha']}; IRS bounded the two-sided disparity P[f ≠ f_q] (the file has no `disparity` key):\n\n" +
               table(["σ", "quantized model", "full CERTIFY s/image", "IRS s/image", "speed-up",
                      "certified r = 0 (full / IRS)", "ACR (full / IRS)", "inputs on the IRS path"], rows))
    for name in ("irs_bench_sigma050_w8a8.json", "irs_bench_sigma050_w8a8_labels.json"):
        d = load(name)
        v = d["sigmas"]["0.5"]
        w = v["W8A8"]
        rows = [["float model (certified once)", f"{v['float']['s_per_image']:.2f}", cert(v["float"]["certified_accuracy"]),
                 f3(v["float"]["acr"]), "–", "–"],
                ["full CERTIFY of W8A8", f"{w['full']['s_per_image']:.2f}", cert(w["full"]["certified_accuracy"]),
                 f3(w["full"]["acr"]), "–", "–"]]
        for k, r in w.items():
            if not k.startswith("irs"):
                continue
            sp = r.get("speedup", w.get("speedup"))
            spl = r.get("speedup_with_float_labels")
            rows.append([f"IRS, n_p = {r.get('n_p', d['n_p']):,}", f"{r['s_per_image']:.2f}",
                         cert(r["certified_accuracy"]), f3(r["acr"]), f"{r['cost']['mean_zeta_upper']:.3f}",
                         ratio(sp) + (f" ({ratio(spl)} paying for f's labels)" if spl else "")])
        out.append(source(name, f"{d['runtime']}; no machine recorded") +
                   f", σ = 0.5, {d['images']} test images, N = {d['n']:,}, disparity {d['disparity']}:\n\n" +
                   table(["run", "s/image", "certified r = 0 / 0.25 / 0.5", "ACR", "mean ζ̄ upper bound",
                          "speed-up over full CERTIFY"], rows))
    return "\n\n".join(out)


def equal_acr() -> str:
    out = []
    for name in ("irs_bench_sigma050_equal_acr.json", "irs_bench_sigma050_equal_acr_fallback.json",
                 "irs_bench_sigma050_equal_acr_interleaved.json", "irs_bench_sigma050_equal_acr_100img.json"):
        d = load(name)
        v = d["sigmas"]["0.5"]
        w = v["W8A8"]
        f = v["float"]
        rows = []
        for k, r in w.items():
            if not k.startswith("irs"):
                continue
            e = r["equal_acr"]
            fb = r["fallback_n"]
            rows.append([f"n_p = {r['n_p']:,}, " + (f"fallback at N = {fb:,}" if fb else "no fallback"),
                         f3(r["acr"]), cert(r["certified_accuracy"]), n0(e["baseline_n"]),
                         cert(e["certified_accuracy"]), f"{e['certified_accuracy_max_abs_diff_pp']:.1f} pp",
                         n0(r["cost"]["quant_samples_per_input"]),
                         f"{ratio(e['speedup'])} ({ratio(e['speedup_with_float_labels'])})"])
        base = ", ".join(f"N = {int(n):,}: ACR {b['acr']:.3f}, {b['s_per_image']:.2f} s/image"
                         for n, b in w["baseline"].items())
        out.append(source(name, f"{d['runtime']}; no machine recorded") +
                   f": σ = 0.5, W8A8, {d['images']} test images; float model certified at N = {f['n']:,} "
                   f"({f['s_per_image']:.1f} s/image, {cert(f['certified_accuracy'])}, ACR {f['acr']:.3f}); "
                   f"baseline (CERTIFY of W8A8 from scratch) {base}:\n\n" +
                   table(["IRS", "ACR", "certified r = 0 / 0.25 / 0.5", "baseline N at that ACR",
                          "baseline certified there", "largest gap", "f_q samples per image (IRS)",
                          "speed-up at equal ACR (paying for f's labels)"], rows))
    return "\n\n".join(out)


def robustness() -> str:
    d = load("robustness_study.json")
    s = d["settings"]
    rows = []
    for name, m in d["models"].items():
        a = m["adversarial"]
        rows.append([name, m["kind"], m["bits"], f2(m["clean"]), f3(m["corruption_mean"]),
                     f2(m["mce"]) if "mce" in m else "1.00 (reference)", f3(m["mnr"]), f3(m["acc_s_acc_s"]),
                     f"{a['fgsm@2/255']:.2f} · {a['fgsm@8/255']:.2f}", f"{a['pgd@2/255']:.2f} · {a['pgd@8/255']:.2f}"])
    text = (source("robustness_study.json", f"{s['threads']} threads; no machine recorded") +
            f": {len(d['models'])} models; {d['test_images']} test images, {d['corruption_images']} for corruptions "
            f"(severities {s['severities']}), {s['train_images']:,} training images, QAT and adversarial training "
            f"{s['qat_epochs']} epoch (QAT LR {s['qat_lr']}, PGD-{s['pgd_train_steps']} for training):\n\n" +
            table(["model", "kind", "bits", "clean", "corruption mean", "mCE vs float", "mNR", "ACC_s",
                   "FGSM 2/255 · 8/255", "PGD 2/255 · 8/255"], rows))
    rows = [[k, t["claim"], "yes" if t["reproduced"] else "no", "`" + json.dumps(rounded(t["evidence"]), ensure_ascii=False) + "`"]
            for k, t in d["trends"].items()]
    text += "\n\nPublished trends, as the study scores them:\n\n" + table(["", "claim", "reproduced", "evidence"],
                                                                          rows)
    g = d["gradient_masking"]
    gm = g if isinstance(g, list) else [g]
    text += "\n\nGradient-masking check: " + "; ".join(
        f"{x['model']}: {'passed' if x['passed'] else 'failed'} ({'; '.join(x.get('reasons', []))})" for x in gm)
    return text


def adaptive() -> str:
    return _adaptive("adaptive_bench_n100k.json")


def adaptive_10k() -> str:
    return _adaptive("adaptive_bench.json")


def sequential_100() -> str:
    """Sequential certification alone on 100 images per σ: the earlier doubling grid and what certify --radii runs."""
    rows = []
    for name in ("adaptive_bench_sequential_100img.json", "adaptive_bench_sequential_100img_offset5_doubling.json",
                 "adaptive_bench_sequential_100img_new_schedule.json"):
        d = load(name)
        sc = d["scale"]
        first = sc.get("image_offset", 0)
        for sg, v in d["sigmas"].items():
            m, looks = v["sequential"], v.get("sequential_looks", v["looks"])
            ca = m["certified_accuracy"]
            rows.append([f"`{name}`", sg, f"{first}, {first + sc['image_step']}, …, {first + (sc['images'] - 1) * sc['image_step']}",
                         f"{len(looks)} looks, ×{looks[1] / looks[0]:.1f}, β = {v.get('futility_beta', 0.01)}",
                         " / ".join("–" if ca.get(r) is None else f"{100 * ca[r]:.0f}"
                                    for r in ("0.25", "0.5", "0.75", "1")) + " %",
                         n0(m["evaluations_mean"]), n0(m["evaluations_median"]),
                         ratio((sc["n0"] + sc["n"]) / m["evaluations_mean"])])
    return table(["JSON", "σ", "test images", "schedule", "certified r = 0.25 / 0.5 / 0.75 / 1.0",
                  "evaluations / input (mean)", "median", "fewer than fixed N = 100,000"], rows)


def sequential_vs_fixed() -> str:
    """Sequential certification against a real fixed-N run on the same 100 images (merged JSON)."""
    name = "adaptive_bench_sequential_vs_fixed_100img.json"
    d = load(name)
    sc, h = d["scale"], d["host"]
    first = sc.get("image_offset", 0)
    rows, totals = [], []
    for sg, v in d["sigmas"].items():
        if "fixed" not in v:  # a σ the sequential run covered and the fixed run did not
            continue
        f, q, g = v["fixed"], v["sequential"], v["goals"]
        for r in (format(x, "g") for x in v["radii_decided"]):
            dis = g["sequential_disagreements"][r]
            rows.append([sg, r, f"{100 * f['certified_accuracy'][r]:.0f}%", f"{100 * q['certified_accuracy'][r]:.0f}%",
                         f"{g['sequential_certified_accuracy_gap_pp'][r]:+.0f}",
                         ", ".join(f"{x[0]} ({x[1]:.4f})" for x in dis["lost"]) or "none",
                         ", ".join(f"{x[0]} ({x[1]:.4f})" for x in dis["gained"]) or "none"])
        totals.append([sg, n0(f["evaluations_mean"]), n0(q["evaluations_mean"]), ratio(g["sequential_evaluation_ratio"]),
                     f"{g['sequential_max_abs_gap_pp']:.0f} pp", "yes" if g["sequential_met"] else "no"])
    return (source(name, f"CPU {h['cpu_model']}, {h['cpus']} cores") + ", merged from "
            + ", ".join(f"`{Path(m).name}`" for m in d["merged_from"]) + f"; {sc['images']} lossless test images "
            f"{first}, {first + sc['image_step']}, …, N = cap = {sc['n']:,}, α = {sc['alpha']}, the certify --radii "
            "grid:\n\n"
            + table(["σ", "evaluations / input, fixed N", "sequential", "fewer", "largest gap at a requested radius",
                     "goal met (≤ 1 pp, ≥ 20×)"], totals)
            + "\n\nPer radius (certified accuracy; the inputs fixed N certifies and the sequential run does not, and "
            "the other way round, with fixed N's hit rate p̂):\n\n"
            + table(["σ", "r", "fixed N", "sequential", "gap, pp", "lost (image, p̂)", "gained (image, p̂)"], rows)
            + _adaptive_vs_fixed(d))


# adaptive runs at another tolerance on the merged JSON's images: rows beside its own adaptive runs
EARLIER_ADAPTIVE = ("adaptive_bench_adaptive_100img_offset5_sigma050.json",
                    "adaptive_bench_adaptive_100img_offset5_sigma025.json")


def _adaptive_vs_fixed(d: dict, earlier=EARLIER_ADAPTIVE) -> str:
    """The adaptive runs of a merged 100-image JSON (and `earlier` runs on the same images at other tolerances): ACR
    against fixed N where the fixed run exists, evaluations against fixed N's known cost (n0 + N per input)."""
    sc, rows, seen = d["scale"], [], set()
    fixed_cost = sc["n0"] + sc["n"]
    runs = [(sg, v["adaptive"], v) for sg, v in d["sigmas"].items() if "adaptive" in v]
    for name in earlier:
        e = load(name)
        if e["scale"]["images"] == sc["images"] and e["scale"].get("image_offset") == sc.get("image_offset"):
            runs += [(sg, {"tolerance": e["scale"]["tolerance"]} | v["adaptive"], d["sigmas"].get(sg, {}))
                     for sg, v in e["sigmas"].items() if "adaptive" in v]
    for sg, a, v in runs:
        f, tol = v.get("fixed"), a["tolerance"]
        if (sg, tol) in seen:  # an earlier run that the merged JSON already holds
            continue
        seen.add((sg, tol))
        ratio_x = fixed_cost / a["evaluations_mean"]
        gap = a["acr"] - f["acr"] if f else None
        rows.append([sg, f"{tol:g}", f3(f["acr"]) if f else "not run", f3(a["acr"]),
                     f"{gap:+.4f}" if f else "–", n0(a["evaluations_mean"]),
                     n0(a["evaluations_median"]), n0(sum(e >= fixed_cost for e in (r[2] for r in a["per_input"]))),
                     ratio(ratio_x), ("yes" if abs(gap) <= 0.01 and ratio_x >= 3 else "no") if f else
                     f"{'≥' if ratio_x >= 3 else '<'} 3×; ACR not compared"])
    if not rows:
        return ""
    return ("\n\nAdaptive radius estimation (`certify --adaptive`) on the same images, against fixed N's ACR where "
            "that run exists:\n\n"
            + table(["σ", "tolerance", "ACR, fixed N", "ACR, adaptive", "gap", "evaluations / input (mean)", "median",
                     "inputs at the cap", "fewer than fixed N", "goal met (ACR within 0.01, ≥ 3×)"], rows))


def schedule_sim() -> str:
    d = load("sequential_schedule_sim.json")
    rows = []
    for sg, v in d["sigmas"].items():
        for s in v["schedules"]:
            rows.append([sg, f"{s['first_n']}, ×{s['ratio']:g}, {s['final_share']:g}, {s['futility_beta']:g}"
                         + (" (certify --radii)" if s["certify_radii_default"] else ""),
                         n0(s["evaluations_mean"]), ratio(s["fewer_than_fixed"]),
                         " / ".join(f"{g:+.2f}" for g in s["certified_accuracy_gap_pp_mean"].values()),
                         f"{100 * s['share_of_replicates_within_1pp_at_every_radius']:.0f}%"])
    return (f"`benchmarks/results/sequential_schedule_sim.json` ({d['replicates']} replicate draws per input, rates "
            f"from `{d['source']}`, N = cap = {d['n']:,}, α = {d['alpha']}):\n\n"
            + table(["σ", "first look, ratio, α share on the cap, β", "evaluations / input (mean)",
                     "fewer than fixed N", "certified accuracy − fixed N, pp, per radius (mean)",
                     "draws within 1 pp at every radius"], rows))


def adaptive_tolerance_sim() -> str:
    """Adaptive estimation's look schedule and tolerance replayed on fixed N's per-input rates."""
    d = load("adaptive_tolerance_sim.json")
    rows = []
    for sg, v in d["sigmas"].items():
        for c in v["configs"]:
            rows.append([sg, f"{c['first_n']}, ×{c['ratio']:g}, {c['final_share']:g}, {c['tolerance']:g}"
                         + (" (certify --adaptive)" if c["certify_adaptive_default"] else ""),
                         n0(c["evaluations_mean"]), ratio(c["fewer_than_fixed"]), f"{c['acr_gap_mean']:+.4f}",
                         f"{100 * c['share_of_replicates_meeting_goal']:.0f}%"])
    return (f"`benchmarks/results/adaptive_tolerance_sim.json` ({d['replicates']} replicate draws per input, rates "
            f"from fixed N in `{d['source']}`, N = cap = {d['n']:,}, α = {d['alpha']}):\n\n"
            + table(["σ", "first look, ratio, α share on the cap, tolerance", "evaluations / input (mean)",
                     "fewer than fixed N", "ACR − fixed N (mean)", "draws meeting the goal (within 0.01, ≥ 3×)"],
                    rows))


def _adaptive(name: str) -> str:
    d = load(name)
    h, sc = d["host"], d["scale"]
    mach = (f"CPU {h['cpu_model']}, {h['cpus']} cores, flags {', '.join(h['isa_flags']) or 'none recorded'}; load "
            f"average {h['load_average'][0]} at the start, {h['load_average_at_end'][0]} at the end")
    radii = ["0.25", "0.5", "0.75", "1"]
    rows = []
    for sg, v in d["sigmas"].items():
        for mode in ("fixed", "sequential", "adaptive"):
            m = v[mode]
            ca = m["certified_accuracy"]
            rows.append([sg, {"fixed": f"fixed N = {sc['n']:,}", "sequential": "sequential (--radii)",
                              "adaptive": f"adaptive (tolerance {m.get('tolerance', sc.get('tolerance'))})"}[mode],
                         " / ".join("–" if ca.get(r) is None else f"{100 * ca[r]:.0f}" for r in radii) + " %",
                         f3(m.get("acr")), n0(m["evaluations_mean"]), n0(m["evaluations_median"]),
                         f"{m['seconds']:.0f}"])
    text = (source(name, mach) + f", {d['runtime']}; {sc['images']} lossless test images (every "
            f"{sc['image_step']}th), N0 = {sc['n0']}, N = cap = {sc['n']:,}, α = {sc['alpha']}, first look "
            f"{sc['first_n']:,}; the literature's setting is N = 100,000 on 100 images:\n\n"
            + table(["σ", "mode", "certified r = 0.25 / 0.5 / 0.75 / 1.0", "ACR", "evaluations / input (mean)",
                     "median", "wall s"], rows))
    rows = []
    for sg, v in d["sigmas"].items():
        g = v["goals"]
        rows.append([sg, f"{g['sequential_max_abs_gap_pp']:.1f} pp", ratio(g["sequential_evaluation_ratio"]),
                     "yes" if g["sequential_met"] else "no", f"{g['adaptive_acr_gap']:+.3f}",
                     ratio(g["adaptive_evaluation_ratio"]), "yes" if g["adaptive_met"] else "no",
                     ", ".join(format(r, "g") for r in v["radii_beyond_cap"]) or "none"])
    text += ("\n\nAgainst the goals (sequential: certified accuracy within 1 pp at every radius with ≥ 20× fewer "
             "evaluations; adaptive: ACR within 0.01 with ≥ 3× fewer):\n\n"
             + table(["σ", "sequential: largest gap", "fewer evaluations", "met", "adaptive: ACR − fixed",
                      "fewer evaluations", "met", "radii beyond the cap (not asked)"], rows))
    return text


def reward_rank() -> str:
    name = "reward_rank_bench.json"
    d = load(name)
    h, sc = d["host"], d["scale"]
    end = h.get("load_average_at_end")
    mach = (f"CPU {h['cpu_model']}, {h['cpus']} cores, flags {', '.join(h['isa_flags']) or 'none recorded'}; load "
            f"average {h['load_average'][0]} at the start" + (f", {end[0]} at the end" if end else ""))
    labels = {"full": f"full CERTIFY (n0 = {sc['n0']}, N = {sc['n']:,})", "irs": f"IRS (n_p = {sc['n_p']})",
              "irs-small": f"IRS (n_p = {sc['small_n_p']})"}
    rows = []
    for key, k in d["kinds"].items():
        st = k.get("settings") or {"n_p": sc["n_p"], "first_n": sc["first_n"], "tolerance": key.rpartition("-")[2]}
        label = labels.get(key) or (f"adaptive (cap {st['n_p']}, first look {st['first_n']}, tolerance "
                                    f"{float(st['tolerance']):g}" + (", stop near f" if st.get("stop") == "float"
                                                                     else "") + ")")
        # with the shared f_q cache, a reward that replays rows another computed ran faster than alone: no seconds
        alone = k.get("computed_per_reward", k["samples_per_reward"]) >= k["samples_per_reward"]
        rows.append([label, f2(k["spearman_vs_full"]), f2(k.get("spearman_near_float")), f2(k.get("spearman_others")),
                     f2(k.get("pearson_vs_full")), n0(k["samples_per_reward"]), ratio(k["cheaper_than_irs"]),
                     f3(k["mean_reward"]), f"{k['seconds_per_reward']:.1f}" if alone else "–"])
    text = (source(name, mach) + f", {d['runtime']}; {d['model']}, {sc['policies']} random mixed policies "
            f"({sc['policy_sampling']}), {sc['images']} validation images, α = α_ζ = {sc['alpha']}; the float model's "
            f"one-off cost ({n0(d['float_model']['one_off_evaluations']['certify'])} CERTIFY + "
            f"{n0(d['float_model']['one_off_evaluations']['irs_labels'])} IRS-label evaluations) is not in the "
            "per-reward counts"
            + (f"; ρ is also given apart for the {d['near_float']['policies']} near-float policies (full-N reward "
               f"within {d['near_float']['cluster']:g} of the best: {f3(d['near_float']['full_reward_range'][0])}–"
               f"{f3(d['near_float']['full_reward_range'][1])}) and the other "
               f"{sc['policies'] - d['near_float']['policies']}, with Pearson's r over all"
               if "near_float" in d else "") + ":\n\n"
            + table(["reward", "Spearman ρ vs full", "ρ near-float", "ρ others", "Pearson r", "f_q evaluations / reward",
                     "cheaper than IRS", "mean reward", "s / reward"], rows))
    rows = [[k, ratio(g["cheaper_than_irs_x"]), f3(g["spearman"]), "yes" if g["met"] else "no"]
            for k, g in d["goals"].items()]
    text += ("\n\nAgainst the goal (≥ 3× fewer samples than the IRS reward, ρ ≥ 0.9 against the full-N reward):\n\n"
             + table(["reward", "cheaper than IRS", "ρ", "met"], rows))
    return text


def reward_retest(name: str = "reward_rank_bench_retest.json") -> str:
    """The ranking run again with a second full reward on other noise: the reference's own reproducibility."""
    d = load(name)
    h, sc, ref = d["host"], d["scale"], d["reference"]
    rows = [[key, f2(k["spearman_vs_full"]), f2(k["spearman_vs_retest"]), f2(k["spearman_vs_both"]),
             f2(k["spearman_near_float"]), ratio(k["cheaper_than_irs"])]
            for key, k in d["kinds"].items() if key not in ("full", "full-retest")]
    full = load("reward_rank_bench.json")["scale"]["n"]
    what = ("the run above again" if sc["n"] == full else
            f"the run above with N = {sc['n']:,} instead of {full:,}")
    return (source(name, f"CPU {h['cpu_model']}, {h['cpus']} cores") + f"; {what} ({sc['policies']} "
            f"policies, {sc['images']} images, seed {sc['seed']}), with the full reward scored a second time on noise "
            f"seed {sc['retest_seed']}: the full reward's test-retest Spearman ρ is {f3(ref['test_retest_spearman'])} "
            f"({f3(ref['test_retest_spearman_near_float'])} over the {d['near_float']['policies']} near-float "
            "policies). Every reward's ρ against the first full reward, the second, and the mean of both:\n\n"
            + table(["reward", "ρ vs full (seed 0)", f"ρ vs full (seed {sc['retest_seed']})", "ρ vs their mean",
                     "ρ near-float (seed 0)", "cheaper than IRS"], rows))


SECTIONS = {"tvm_int8": tvm_int8, "runtime": runtime, "certify": certify, "bops": bops, "schemes": schemes, "arq": arq,
            "arq_paired": paired, "irs": irs, "irs_equal_acr": equal_acr, "robustness": robustness,
            "adaptive": adaptive, "adaptive_10k": adaptive_10k, "sequential_100": sequential_100,
            "schedule_sim": schedule_sim, "sequential_vs_fixed": sequential_vs_fixed, "reward_rank": reward_rank,
            "reward_retest": reward_retest,
            "reward_retest_n2000": lambda: reward_retest("reward_rank_bench_retest_n2000.json"),
            "adaptive_tolerance_sim": adaptive_tolerance_sim}


def main(argv: list[str]) -> None:
    for name, fn in SECTIONS.items():
        if argv and not any(w in name for w in argv):
            continue
        print(f"<!-- {name} -->\n{fn()}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
