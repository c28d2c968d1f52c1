"""Mixed-precision quantization policies and bit-operations (BOPs).

BOPs of a layer = MACs × w_bits × a_bits (Baskin et al.; as used by ARQ). A float layer counts as 32 × 32, so the
fraction of W32A32 BOPs is  Σ MACs·w·a / Σ MACs·32·32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.fileio import write_json

POLICY_FORMAT = "arq-deploy/policy"
POLICY_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerBits:
    w_bits: int
    a_bits: int

    def __post_init__(self):
        for what, b in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise PolicyError(f"{what}={b!r} is outside the supported {MIN_BITS}..{MAX_BITS} bits")

    def __str__(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


@dataclass(frozen=True)
class QuantPolicy:
    """Bits per layer, keyed by the layer's qualified module name. Layers not listed take `default`; with no
    default they stay in float (32 bits in BOPs)."""

    layers: Mapping[str, LayerBits] = field(default_factory=dict)
    default: LayerBits | None = None
    version: int = POLICY_VERSION

    @classmethod
    def uniform(cls, w_bits: int, a_bits: int | None = None) -> "QuantPolicy":
        return cls(layers={}, default=LayerBits(int(w_bits), int(a_bits if a_bits is not None else w_bits)))

    @classmethod
    def for_layers(cls, names: Iterable[str], bits: Iterable[tuple[int, int]]) -> "QuantPolicy":
        return cls(layers={n: LayerBits(int(w), int(a)) for n, (w, a) in zip(names, bits)})

    def bits(self, name: str) -> LayerBits | None:
        """The layer's bits, or None when it stays float."""
        return self.layers.get(name, self.default)

    def resolve(self, specs) -> "QuantPolicy":
        """Validate against a model's layers and return the explicit per-layer policy (no default)."""
        self.validate(specs)
        out = {s.name: self.bits(s.name) for s in specs if self.bits(s.name) is not None}
        return QuantPolicy(layers=out)

    def validate(self, specs) -> None:
        known = {s.name for s in specs}
        unknown = [n for n in self.layers if n not in known]
        if unknown:
            raise PolicyError(f"policy names unknown layer(s) {', '.join(unknown[:5])}; the model's layers are "
                              f"{', '.join(list(known)[:6])}{', ...' if len(known) > 6 else ''}")

    def bops(self, specs) -> int:
        total = 0
        for s in specs:
            b = self.bits(s.name)
            total += s.macs * (b.w_bits * b.a_bits if b else FLOAT_BITS * FLOAT_BITS)
        return total

    def bops_fraction(self, specs) -> float:
        full = sum(s.macs for s in specs) * FLOAT_BITS * FLOAT_BITS
        return self.bops(specs) / full if full else 0.0

    def describe(self) -> str:
        if not self.layers:
            return str(self.default) if self.default else "float"
        uniq = sorted({str(b) for b in self.layers.values()} | ({str(self.default)} if self.default else set()))
        return uniq[0] if len(uniq) == 1 else "mixed(" + ",".join(uniq) + ")"

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict:
        return {
            "format": POLICY_FORMAT,
            "version": self.version,
            "default": None if self.default is None else [self.default.w_bits, self.default.a_bits],
            "layers": {n: [b.w_bits, b.a_bits] for n, b in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPolicy":
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise PolicyError(f"not an arq-deploy policy (expected format {POLICY_FORMAT!r})")
        if d.get("version") != POLICY_VERSION:
            raise PolicyError(f"policy format version {d.get('version')!r} is not supported (expected {POLICY_VERSION})")
        try:
            layers = {str(n): LayerBits(*_pair(v)) for n, v in (d.get("layers") or {}).items()}
            default = None if d.get("default") is None else LayerBits(*_pair(d["default"]))
        except (TypeError, ValueError) as e:
            raise PolicyError(f"malformed policy entry: {e}") from None
        return cls(layers=layers, default=default, version=POLICY_VERSION)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantPolicy":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy is not valid JSON: {e}") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "QuantPolicy":
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {path} does not exist")
        return cls.from_json(path.read_text())


def _pair(v) -> tuple[int, int]:
    if isinstance(v, dict):
        v = (v["w_bits"], v["a_bits"])
    w, a = v
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (w, a)):
        raise ValueError(f"bits must be integers, got {v!r}")
    return int(w), int(a)


def parse_bits(text: str) -> QuantPolicy:
    """'8' -> W8A8; 'W4A8' or '4,8' -> W4A8 uniform; 'float' or '32' -> no quantization."""
    t = text.strip().upper().replace(" ", "")
    if t in ("FLOAT", "32", "FP32", "W32A32"):
        return QuantPolicy()
    try:
        if t.startswith("W") and "A" in t:
            w, a = t[1:].split("A")
            return QuantPolicy.uniform(int(w), int(a))
        if "," in t:
            w, a = t.split(",")
            return QuantPolicy.uniform(int(w), int(a))
        return QuantPolicy.uniform(int(t))
    except ValueError:
        raise PolicyError(f"cannot read bits {text!r}: use 8, W4A8 or 4,8") from None
