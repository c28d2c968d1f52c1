"""Robustness of quantized ResNet-20s on CIFAR-10: quantizers × bit-widths × pipelines.

Do the published trends reproduce (RobustMQ, Xiao et al. 2023; "Investigating the Impact of Quantization on
Adversarial Robustness", 2024)?
  T1  lower bit-width -> higher adversarial robustness, but lower natural (corruption) and systematic robustness;
  T2  impulse noise and glass blur are the most harmful corruptions;
  T3  nearest-neighbour resizing is the most harmful systematic noise;
  T4  quantization without robust training resists ε = 2/255 but not 8/255;
  T5  adversarial training inside QAT restores robustness close to the adversarially trained float model.

Models, all initialised from the standard pretrained ResNet-20 (../shared/data/models/resnet20-12fca82f.th):
  float; PTQ (percentile, min-max, PWLQ) at 2/4/6/8 bits; QAT (DoReFa, PACT, LSQ) at 2/4/6/8 bits (vanilla, `--qat-
  epochs` over `--train-images` training images); float PGD adversarial training (PGD-AT) then PTQ at 4 bits; QAT with
  PGD-AT (LSQ at 4 bits); robust distillation (LSQ at 4 bits, the float PGD-AT model as teacher).
Evaluation on a seeded subset of the test set, on the torch fake-quant models (they agree with their QDQ exports;
`arq-deploy check ... --compare-torch` measures that on the deployed artifact):
  clean accuracy; the 19 corruptions at `--severities` (mean accuracy, mNR, mCE against the float model); the 28
  systematic variations (ACC_s, worst); FGSM and PGD-10 (L∞) at 2/255 and 8/255 (torchattacks), with the
  gradient-masking check on one quantized model.

    python benchmarks/robustness_study.py [--quick] [--test-images 200] [--train-images 5000]
writes benchmarks/results/robustness_study.json and robustness_study.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "T1": "lower bit-width: higher adversarial, lower natural and systematic robustness (RobustMQ)",
    "T2": "impulse noise and glass blur are the most harmful corruptions (RobustMQ)",
    "T3": "nearest-neighbour resizing is the most harmful systematic noise (RobustMQ)",
    "T4": "quantization without robust training resists eps=2/255 but not 8/255 (Investigating..., 2024)",
    "T5": "adversarial training in QAT restores robustness close to float (Investigating..., 2024)",
}


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--corruption-images", type=int, default=100)
    ap.add_argument("--severities", default="1,3,5")
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--at-epochs", type=int, default=1)
    ap.add_argument("--bits", default="2,4,6,8")
    ap.add_argument("--pgd-train-steps", type=int, default=3)
    ap.add_argument("--qat-lr", type=float, default=0.001, help="QAT peak LR (0.01 collapses BN-folded ResNet-20s)")
    ap.add_argument("--at-lr", type=float, default=0.01, help="float adversarial-training peak LR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="8-bit and 4-bit only, 1,000 training images, 100 test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness_study.json"))
    a = ap.parse_args()
    if a.quick:
        a.bits, a.train_images, a.test_images, a.corruption_images = "4,8", 1000, 100, 50
    return a


class Evaluator:
    """Precomputed corrupted / systematic test images, evaluated for any torch model."""

    def __init__(self, test, args):
        from arq_deploy.certify.checks.corruptions import CORRUPTIONS, corrupt
        from arq_deploy.certify.checks.systematic import VARIATIONS, apply_variation
        from arq_deploy.export.pipeline import pick

        idx = pick(len(test), args.test_images, args.seed)
        self.x, self.y = test.x(idx), test.labels[idx].astype(np.int64)
        n_c = min(args.corruption_images, len(idx))
        self.sev = [int(s) for s in args.severities.split(",")]
        t0 = time.perf_counter()
        self.corrupted = {(c, s): corrupt(self.x[:n_c], c, s, args.seed, ids=idx[:n_c])
                          for c in CORRUPTIONS for s in self.sev}
        self.systematic = {v: apply_variation(self.x, v) for v in VARIATIONS}
        self.prep_seconds = time.perf_counter() - t0
        self.n_c = n_c

    @staticmethod
    def accuracy(model, x, y, batch=250) -> float:
        import torch

        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), batch):
                correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
        return correct / len(x)

    def evaluate(self, model, float_rows=None) -> dict:
        import torch

        from arq_deploy.certify.checks import robust_metrics as rm
        from arq_deploy.certify.checks.attacks import AttackConfig, attack_batch

        model.eval()
        t0 = time.perf_counter()
        clean = self.accuracy(model, self.x, self.y)
        clean_c = self.accuracy(model, self.x[:self.n_c], self.y[:self.n_c])
        rows = [{"corruption": c, "severity": s, "accuracy": self.accuracy(model, xc, self.y[:self.n_c])}
                for (c, s), xc in self.corrupted.items()]
        sys_acc = {v: self.accuracy(model, xs, self.y) for v, xs in self.systematic.items()}
        adv = {}
        cfg = AttackConfig(steps=10)
        xt, yt = torch.from_numpy(self.x), torch.from_numpy(self.y)
        for name in ("fgsm", "pgd"):
            for eps in (2 / 255, 8 / 255):
                correct = 0
                for i in range(0, len(xt), 100):
                    xa = attack_batch(name, model, xt[i:i + 100], yt[i:i + 100], eps, cfg, seed=i)
                    with torch.no_grad():
                        correct += int((model(xa).argmax(1) == yt[i:i + 100]).sum())
                adv[f"{name}@{round(eps * 255)}/255"] = correct / len(xt)
        per_c = {}
        for r in rows:
            per_c.setdefault(r["corruption"], []).append(r["accuracy"])
        out = {"clean": clean, "clean_corruption_subset": clean_c,
               "corruption_mean": float(np.mean([r["accuracy"] for r in rows])),
               "mnr": rm.mnr(rows, clean_c) if clean_c > 0 else None,
               "corruption_by_name": {c: float(np.mean(v)) for c, v in per_c.items()},
               "systematic": sys_acc, **{f"acc_s_{k}": v for k, v in rm.acc_s(sys_acc).items()},
               "adversarial": adv, "wcar_2": min(adv["fgsm@2/255"], adv["pgd@2/255"]),
               "wcar_8": min(adv["fgsm@8/255"], adv["pgd@8/255"]), "eval_seconds": 0.0}
        if float_rows is not None:
            out["mce"] = rm.mce(rows, float_rows)
        out["rows"] = rows
        out["eval_seconds"] = time.perf_counter() - t0
        return out


def main():
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import load, pick, quantize_calibrated, train

    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    weights = str(shared / "models" / "resnet20-12fca82f.th")
    train_full, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    tr = train_full.subset(pick(len(train_full), args.train_images, args.seed))
    calib_x = train_full.x(pick(len(train_full), 512, args.seed + 1))
    ev = Evaluator(test, args)
    print(f"precomputed {len(ev.corrupted)} corruption sets and {len(ev.systematic)} systematic variations in "
          f"{ev.prep_seconds:.0f} s", flush=True)
    bits = [int(b) for b in args.bits.split(",")]
    results: dict[str, dict] = {}

    def record(name, model, kind, b, train_s=0.0, **extra):
        r = ev.evaluate(model, results.get("float", {}).get("rows"))
        r.update(kind=kind, bits=b, train_seconds=round(train_s, 1), **extra)
        results[name] = r
        print(f"{name:22s} clean {r['clean']:.3f} corr {r['corruption_mean']:.3f} sys {r['acc_s_acc_s']:.3f} "
              f"pgd2 {r['adversarial']['pgd@2/255']:.3f} pgd8 {r['adversarial']['pgd@8/255']:.3f} "
              f"(train {train_s:.0f} s, eval {r['eval_seconds']:.0f} s)", flush=True)

    def fresh():
        return load("resnet20", weights)

    lm = fresh()
    record("float", lm.model, "float", 32)
    for method in ("percentile", "minmax", "pwlq"):
        for b in bits:
            q, _ = quantize_calibrated(fresh(), QuantPolicy.uniform(b), calib_x, 0.0, args.seed, method=method)
            record(f"ptq-{method}-w{b}a{b}", q, "ptq", b, method=method)
    for method in ("dorefa", "pact", "lsq"):
        for b in bits:
            t0 = time.perf_counter()
            q, _ = train(fresh(), tr, 0.0, args.qat_epochs, lr=args.qat_lr, batch_size=128, seed=args.seed,
                         policy=QuantPolicy.uniform(b), mode="vanilla", quantizer=method, progress=False)
            record(f"qat-{method}-w{b}a{b}", q, "qat", b, time.perf_counter() - t0, method=method)
    at = dict(mode="pgd", eps=8 / 255, pgd_steps=args.pgd_train_steps)
    t0 = time.perf_counter()
    fat, _ = train(fresh(), tr, 0.0, args.at_epochs, lr=args.at_lr, batch_size=128, seed=args.seed, progress=False, **at)
    record("float-pgd-at", fat, "float-at", 32, time.perf_counter() - t0)
    lm_at = fresh()
    lm_at.model = fat
    q, _ = quantize_calibrated(lm_at, QuantPolicy.uniform(4), calib_x, 0.0, args.seed, method="percentile")
    record("ptq-of-at-w4a4", q, "ptq-at", 4, method="percentile")
    t0 = time.perf_counter()
    q, _ = train(fresh(), tr, 0.0, args.at_epochs, lr=args.qat_lr, batch_size=128, seed=args.seed, progress=False,
                 policy=QuantPolicy.uniform(4), quantizer="lsq", **at)
    record("qat-lsq-pgd-at-w4a4", q, "qat-at", 4, time.perf_counter() - t0, method="lsq")
    t0 = time.perf_counter()
    q, _ = train(fresh(), tr, 0.0, args.at_epochs, lr=args.qat_lr, batch_size=128, seed=args.seed, progress=False,
                 policy=QuantPolicy.uniform(4), quantizer="lsq", mode="distill", eps=8 / 255,
                 pgd_steps=args.pgd_train_steps, teacher=lm_at)
    record("qat-lsq-distill-w4a4", q, "qat-distill", 4, time.perf_counter() - t0, method="lsq")

    masking = masking_check(results, ev, fresh, tr, args)
    trends = judge(results, bits)
    write(args, results, trends, masking, ev)


def masking_check(results, ev, fresh, tr, args) -> dict:
    """The gradient-masking check on the lowest-bit PTQ model (most rounding): are its attack numbers trustworthy?"""
    from arq_deploy.certify.checks.attacks import gradient_masking_check
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import pick, quantize_calibrated

    b = min(r["bits"] for r in results.values())
    calib_x = tr.x(pick(len(tr), 512, args.seed + 1))
    q, _ = quantize_calibrated(fresh(), QuantPolicy.uniform(b), calib_x, 0.0, args.seed)
    rep = gradient_masking_check(q.eval(), ev.x[:50], ev.y[:50], 8 / 255, seed=args.seed)
    return {"model": f"ptq-percentile-w{b}a{b}", "passed": rep["passed"], "reasons": rep["reasons"],
            "pgd_accuracy": rep["pgd_accuracy"], "square_accuracy": rep["square_accuracy"],
            "large_eps_accuracy": rep["large_eps_accuracy"]}


def _spearman(xs, ys) -> float | None:
    from scipy.stats import spearmanr

    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def judge(results, bits) -> dict:
    """Each trend: the measured evidence and whether it reproduced."""
    out = {}
    quant = [r for r in results.values() if r["kind"] in ("ptq", "qat") and r["clean"] > 0.2]
    b = [r["bits"] for r in quant]
    rho = {k: _spearman(b, [f(r) for r in quant]) for k, f in (
        ("pgd2_vs_bits", lambda r: r["adversarial"]["pgd@2/255"]), ("fgsm2_vs_bits", lambda r: r["adversarial"]["fgsm@2/255"]),
        ("corruption_vs_bits", lambda r: r["corruption_mean"]), ("systematic_vs_bits", lambda r: r["acc_s_acc_s"]),
        ("clean_vs_bits", lambda r: r["clean"]))}
    adv_up = (rho["fgsm2_vs_bits"] or 0) < 0
    out["T1"] = {"evidence": {"spearman_over_models_with_clean_acc_above_0.2": rho, "models": len(quant)},
                 "reproduced": bool(adv_up and (rho["corruption_vs_bits"] or 0) > 0
                                    and (rho["systematic_vs_bits"] or 0) > 0),
                 "note": "negative rho for attacks = fewer bits, more robust; positive rho for corruption/systematic "
                         "= fewer bits, less robust"}
    by_name: dict[str, list[float]] = {}
    for r in results.values():
        for c, a in r["corruption_by_name"].items():
            by_name.setdefault(c, []).append(a)
    ranking = sorted(by_name, key=lambda c: np.mean(by_name[c]))
    out["T2"] = {"evidence": {"most_harmful": ranking[:5],
                              "mean_accuracy": {c: float(np.mean(by_name[c])) for c in ranking[:5]}},
                 "reproduced": bool({"impulse_noise", "glass_blur"} <= set(ranking[:4]))}
    sys_mean: dict[str, list[float]] = {}
    for r in results.values():
        for v, a in r["systematic"].items():
            if v != "reference":
                sys_mean.setdefault(v, []).append(a)
    sys_rank = sorted(sys_mean, key=lambda v: np.mean(sys_mean[v]))
    out["T3"] = {"evidence": {"most_harmful": sys_rank[:4],
                              "mean_accuracy": {v: float(np.mean(sys_mean[v])) for v in sys_rank[:4]}},
                 "reproduced": "nearest" in sys_rank[0]}
    plain = [r for r in results.values() if r["kind"] in ("ptq", "qat")]
    fl = results["float"]
    p2 = float(np.mean([r["adversarial"]["pgd@2/255"] for r in plain]))
    p8 = float(np.mean([r["adversarial"]["pgd@8/255"] for r in plain]))
    out["T4"] = {"evidence": {"float_pgd2": fl["adversarial"]["pgd@2/255"], "float_pgd8": fl["adversarial"]["pgd@8/255"],
                              "quantized_mean_pgd2": p2, "quantized_mean_pgd8": p8,
                              "quantized_mean_fgsm2": float(np.mean([r["adversarial"]["fgsm@2/255"] for r in plain]))},
                 "reproduced": bool(p2 > fl["adversarial"]["pgd@2/255"] + 0.05 and p8 < 0.1)}
    fat, qat = results["float-pgd-at"], results["qat-lsq-pgd-at-w4a4"]
    van = results.get("qat-lsq-w4a4")
    out["T5"] = {"evidence": {"float_at_pgd8": fat["adversarial"]["pgd@8/255"], "qat_at_pgd8": qat["adversarial"]["pgd@8/255"],
                              "qat_vanilla_pgd8": van["adversarial"]["pgd@8/255"] if van else None,
                              "ptq_of_at_pgd8": results["ptq-of-at-w4a4"]["adversarial"]["pgd@8/255"],
                              "distill_pgd8": results["qat-lsq-distill-w4a4"]["adversarial"]["pgd@8/255"]},
                 "reproduced": bool(qat["adversarial"]["pgd@8/255"] >= fat["adversarial"]["pgd@8/255"] - 0.05
                                    and (van is None or qat["adversarial"]["pgd@8/255"]
                                         > van["adversarial"]["pgd@8/255"] + 0.05))}
    for k in out:
        out[k]["claim"] = PAPER[k]
    return out


def write(args, results, trends, masking, ev):
    from arq_deploy.core.fileio import write_json

    slim = {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    doc = {"settings": settings, "test_images": len(ev.x), "corruption_images": ev.n_c,
           "precompute_seconds": ev.prep_seconds, "models": slim, "trends": trends, "gradient_masking": masking}
    write_json(args.out, doc)
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: {"reproduced": v["reproduced"]} for k, v in trends.items()}))
    print(f"wrote {args.out}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    metrics = (("clean", lambda r: r["clean"]), ("corruption mean", lambda r: r["corruption_mean"]),
               ("systematic ACC_s", lambda r: r["acc_s_acc_s"]), ("PGD 2/255", lambda r: r["adversarial"]["pgd@2/255"]))
    groups: dict[str, list] = {}
    for name, r in results.items():
        if r["kind"] in ("ptq", "qat"):
            groups.setdefault(name.rsplit("-", 1)[0], []).append(r)
    for ax, (title, f) in zip(axes, metrics):
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["bits"])
            ax.plot([r["bits"] for r in rs], [f(r) for r in rs], "o-", label=g)
        ax.axhline(f(results["float"]), color="k", ls=":", label="float")
        ax.set(title=title, xlabel="bits (W = A)", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
