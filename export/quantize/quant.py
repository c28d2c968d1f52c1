"""Per-layer fake quantization with straight-through gradients.

Weights: symmetric, per output channel, narrow range q ∈ [-(2^(b-1)-1), 2^(b-1)-1], scale_c = clip_c / q_max where
clip_c = r_c · max|W_c| and the ratio r_c minimises the channel's quantization MSE (searched once, so the scale follows
the weights during quantization-aware training).
Activations (the layer's input): per tensor, affine q ∈ [0, 2^b - 1] with zero point z; unsigned (z = 0) when the
calibration inputs are non-negative (after ReLU), otherwise asymmetric over the [lo, hi] percentile range.
Bias: int32 with scale s_a·s_w,c (what the QDQ ONNX graph stores).
Fake quantization computes  x̂ = (clamp(round(x/s) + z, q_min, q_max) - z) · s  with round = half-to-even, the
same arithmetic as ONNX QuantizeLinear/DequantizeLinear, so the torch model and the exported graph agree.

That is the default method, "percentile". Other methods (min-max, PWLQ, DoReFa, PACT, LSQ) are chosen by name in
`quantize_model(..., method=...)`; export/quantize/quantizers.py holds them, and every layer keeps one export interface
(weight_pieces / weight_int / weight_scale, act_qparams, bias_int / bias_scale) whatever the method.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from arq_deploy.core.errors import UnsupportedOpError
from arq_deploy.core.policy import LayerBits, QuantPolicy
from arq_deploy.export.quantize.primitives import fake_quant, round_ste, weight_qmax  # noqa: F401  (re-exported)
from arq_deploy.export.quantize.quantizers import get_quantizer

INT32_MAX = 2**31 - 1


def mse_clip_ratios(w: torch.Tensor, bits: int, grid: int = 32, lowest: float = 0.3) -> torch.Tensor:
    """Per output channel, the clip ratio r ∈ [lowest, 1] of max|W| minimising ||W - Q(W)||²; w: C_out×...

    All grid ratios are evaluated at once: a G×C_out×K tensor."""
    wf = w.detach().reshape(w.shape[0], -1).float()
    amax = wf.abs().amax(dim=1).clamp_min(1e-12)
    qmax = weight_qmax(bits)
    ratios = torch.linspace(lowest, 1.0, grid)
    s = (ratios[:, None] * amax[None, :] / qmax)[:, :, None]  # G×C×1
    err = ((torch.clamp(torch.round(wf[None] / s), -qmax, qmax) * s - wf[None]) ** 2).sum(dim=2)  # G×C
    return ratios[err.argmin(dim=0)]


class _QuantMixin:
    """Shared state of QuantConv2d and QuantLinear (buffers are saved in the state dict)."""

    def _init_quant(self, bits: LayerBits, method: str = "percentile"):
        self.w_bits, self.a_bits = bits.w_bits, bits.a_bits
        self.method, self.quantizer = method, get_quantizer(method)
        out = self.weight.shape[0]
        self.register_buffer("w_clip_ratio", mse_clip_ratios(self.weight, self.w_bits))
        self.register_buffer("a_scale", torch.ones(()))
        self.register_buffer("a_zero_point", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.quant_enabled = True
        self._calib: list[torch.Tensor] | None = None
        self._calib_min, self._calib_max = float("inf"), float("-inf")
        assert self.w_clip_ratio.shape == (out,)
        self.quantizer.setup(self)

    # weights ---------------------------------------------------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight scale (C_out), of the first piece (see weight_pieces); no gradient."""
        return self.quantizer.weight_scale(self)

    def weight_int(self) -> torch.Tensor:
        """Integer weights (int8 container), same shape as weight; the first piece (see weight_pieces)."""
        return self.quantizer.weight_int(self)

    def weight_pieces(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W_q int8, s_w C_out)]: the dequantized weight is Σ W_q·s_w (one piece, two for PWLQ)."""
        return self.quantizer.weight_pieces(self)

    def qweight(self) -> torch.Tensor:
        """Fake-quantized weight (straight-through gradients), equal to Σ_pieces W_q·s_w."""
        return self.quantizer.qweight(self)

    def bias_scale(self) -> torch.Tensor:
        return (self.quantizer.act_scale(self) * self.weight_scale()).detach()

    def bias_int(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        q = torch.round(self.bias.detach() / self.bias_scale())
        return torch.clamp(q, -INT32_MAX, INT32_MAX).to(torch.int32)

    def qbias(self):
        if self.bias is None:
            return None
        return fake_quant(self.bias, self.bias_scale(), 0.0, -INT32_MAX, INT32_MAX)

    # activations -----------------------------------------------------------------------------------------
    @property
    def a_qmax(self) -> int:
        return 2**self.a_bits - 1

    def act_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the input quantizer as exported (a learned scale included)."""
        return float(self.quantizer.act_scale(self).detach()), int(round(float(self.a_zero_point)))

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None:
            self._observe(x)
            return x
        if not self.quant_enabled:
            return x
        return self.quantizer.qinput(self, x)

    def _observe(self, x: torch.Tensor, per_batch: int = 20000):
        flat = x.detach().reshape(-1).float()
        self._calib_min = min(self._calib_min, float(flat.min()))
        self._calib_max = max(self._calib_max, float(flat.max()))
        if flat.numel() > per_batch:
            idx = torch.randint(0, flat.numel(), (per_batch,), generator=torch.Generator().manual_seed(len(self._calib)))
            flat = flat[idx]
        self._calib.append(flat.cpu())

    def start_calibration(self):
        self._calib, self._calib_min, self._calib_max = [], float("inf"), float("-inf")

    def finish_calibration(self, percentile: float):
        vals = torch.cat(self._calib) if self._calib else torch.zeros(1)
        self._calib = None
        if self._calib_max < self._calib_min:  # nothing observed
            self._calib_min = self._calib_max = 0.0
        lo, hi = self.quantizer.calib_range(self, vals, self._calib_min, self._calib_max, percentile)
        self.quantizer.set_act_range(self, lo, hi)
        self.calibrated.fill_(True)

    def _adopt(self, float_module: nn.Module, bits: LayerBits, method: str = "percentile"):
        self.load_state_dict(float_module.state_dict())
        self._init_quant(bits, method)
        return self

    def forward(self, x):
        """Float op while calibrating or disabled; else op(Q(x), Q(W), Q(b))."""
        if self._calib is not None or not self.quant_enabled:
            self.qinput(x)
            return self._op(x, self.weight, self.bias)
        return self._op(self.qinput(x), self.qweight(), self.qbias())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, method={self.method}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: LayerBits, method: str = "percentile") -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device)
        return q._adopt(conv, bits, method)

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, bits: LayerBits, method: str = "percentile") -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        return q._adopt(lin, bits, method)

    def _op(self, x, w, b):
        return F.linear(x, w, b)


QUANT_TYPES = (QuantConv2d, QuantLinear)


class UnsupportedLayerWarning(UserWarning):
    """A layer the policy gives bits is left in float (quantize_model(..., skip_unsupported=True))."""


# ------------------------------------------------------------------------------------------- subclasses of Conv2d/Linear
# A user's Conv2d/Linear subclass keeps its own class (and attributes, e.g. padding="same" or a padding child): the
# quantized layer is a class made once per subclass, with QuantConv2d/QuantLinear in front of the user's class. A
# subclass that computes its output in a forward of its own (a padding step, a "same"-padding helper, a call of
# super().forward) runs that forward unchanged; the conv2d/linear call inside it that takes the layer's own weight
# gets the quantized input, weight and bias (what the exported graph's Conv/Gemm node gets).
_FUNCS = {F.conv2d: ("input", "weight", "bias"), F.linear: ("input", "weight", "bias")}


def _base_class(mod: nn.Module) -> type | None:
    return nn.Conv2d if isinstance(mod, nn.Conv2d) else nn.Linear if isinstance(mod, nn.Linear) else None


def _own_forward(cls: type) -> bool:
    """Whether a Conv2d/Linear subclass computes its output in code of its own (forward or _conv_forward)."""
    if issubclass(cls, nn.Conv2d):
        return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
    return cls.forward is not nn.Linear.forward


class _OwnWeightCalls(TorchFunctionMode):
    """While active, every F.conv2d/F.linear call given `layer.weight` goes through the layer's quantizers: observed
    while calibrating, computed on Q(x), Q(W), Q(b) while quantizing, or only recorded (`probe`). `calls` counts
    them; `foreign_bias` counts those given a bias other than the layer's own."""

    def __init__(self, layer: nn.Module, probe: bool = False):
        super().__init__()
        self.layer, self.probe = layer, probe
        self.calls, self.foreign_bias = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        names = _FUNCS.get(func)
        if names is None:
            return func(*args, **kwargs)
        args, layer = list(args), self.layer

        def get(i):
            return args[i] if i < len(args) else kwargs.get(names[i])

        def put(i, v):
            if i < len(args):
                args[i] = v
            else:
                kwargs[names[i]] = v

        if get(1) is not layer.weight:
            return func(*args, **kwargs)
        self.calls += 1
        if get(2) is not layer.bias:
            self.foreign_bias += 1
        if not self.probe:
            if layer._calib is not None or not layer.quant_enabled:
                layer.qinput(get(0))
            else:
                put(0, layer.qinput(get(0)))
                put(1, layer.qweight())
                if get(2) is not None:
                    put(2, layer.qbias())
        return func(*args, **kwargs)


class _OwnForwardQuant:
    """In front of QuantConv2d/QuantLinear for a subclass with its own forward: that forward runs as written."""

    _float_cls: type

    def forward(self, *args, **kwargs):
        if self._calib is None and not self.quant_enabled:  # float (also what the ONNX exporter traces)
            return self._float_cls.forward(self, *args, **kwargs)
        with _OwnWeightCalls(self):
            return self._float_cls.forward(self, *args, **kwargs)


_SUBCLASS_QUANT: dict[type, type] = {}


def _quant_class_for(cls: type) -> type:
    """The quantized class of a Conv2d/Linear subclass (made once per subclass)."""
    if cls not in _SUBCLASS_QUANT:
        quant = QuantConv2d if issubclass(cls, nn.Conv2d) else QuantLinear
        bases = ((_OwnForwardQuant,) if _own_forward(cls) else ()) + (quant, cls)
        _SUBCLASS_QUANT[cls] = type(f"Quant{cls.__name__}", bases,
                                    {"_float_cls": cls, "__module__": __name__, "__qualname__": f"Quant{cls.__name__}"})
    return _SUBCLASS_QUANT[cls]


def _probe_input(mod: nn.Module, spec) -> torch.Tensor:
    """A seeded random input of the layer's recorded size (the spec's), for checks of what its forward does."""
    g = torch.Generator().manual_seed(0)
    if isinstance(mod, nn.Conv2d):
        return torch.rand(1, mod.in_channels, *spec.in_size, generator=g) if spec is not None else \
            torch.rand(1, mod.in_channels, *(d * (k - 1) + 5 for d, k in zip(mod.dilation, mod.kernel_size)), generator=g)
    return torch.rand(1, mod.in_features, generator=g)


def unsupported_reason(mod: nn.Module, spec=None) -> str | None:
    """Why the quantizer cannot take module `mod` (a layer of `extract_layer_specs`), or None when it can."""
    base = _base_class(mod)
    if base is None:
        return f"it is a {type(mod).__name__}, not a Conv2d or Linear"
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter) or isinstance(w, nn.parameter.UninitializedParameter):
        return "its weight is not an initialized parameter"
    if not w.is_floating_point():
        return f"its weight is {w.dtype}, not floating point"
    if base is nn.Conv2d and w.dim() != 4 or base is nn.Linear and w.dim() != 2:
        return f"its weight has shape {tuple(w.shape)}"
    b = getattr(mod, "bias", None)
    if b is not None and not isinstance(b, nn.Parameter):
        return "its bias is not a parameter"
    if type(mod) in (nn.Conv2d, nn.Linear) or not _own_forward(type(mod)):
        return None
    # a forward of its own: it must pass its own weight (and bias) to exactly the conv2d/linear the graph holds
    what = "conv2d" if base is nn.Conv2d else "linear"
    try:
        with torch.no_grad(), _OwnWeightCalls(mod, probe=True) as mode:
            mod(_probe_input(mod, spec))
    except Exception as e:  # noqa: BLE001  (the user's code: any error means "cannot check it")
        return f"its own forward ({type(mod).__qualname__}.forward) failed on a probe input: {type(e).__name__}: " \
               f"{str(e).splitlines()[0][:120] if str(e) else ''}"
    if mode.calls == 0:
        return (f"its own forward ({type(mod).__qualname__}.forward) never calls {what} with the layer's weight "
                f"(it transforms the weight first, or computes something else), so the quantized weight would not be "
                f"the one it uses")
    if mode.foreign_bias:
        return f"its own forward passes {what} a bias other than the layer's own"
    return None


def quantize_layer(mod: nn.Module, bits: LayerBits, method: str = "percentile") -> nn.Module:
    """The fake-quant version of one Conv2d/Linear (a subclass included; `mod` itself is reused for a subclass)."""
    if type(mod) is nn.Conv2d:
        return QuantConv2d.from_float(mod, bits, method)
    if type(mod) is nn.Linear:
        return QuantLinear.from_float(mod, bits, method)
    if isinstance(mod, QUANT_TYPES):
        raise UnsupportedOpError(f"{type(mod).__name__} is already quantized")
    mod.__class__ = _quant_class_for(type(mod))
    mod._init_quant(bits, method)
    return mod


# ------------------------------------------------------------------------------------------------ BatchNorm folding
_BN = nn.modules.batchnorm._BatchNorm


def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm that directly follows a Conv2d (BatchNorm2d) or Linear
    (BatchNorm1d) folded into that layer (eval-mode statistics); the folded BatchNorm becomes nn.Identity.

    The module tree and the model's own forward stay as they are, so layer names (extract_layer_specs, policies) keep
    pointing at the same layers, subclasses included. The pairs come from a trace of the model: with `input_shape`
    (C×H×W) from torch.export, the trace the ONNX exporter makes (so a BatchNorm it would fold into a layer is folded
    here first, before the layer is quantized); otherwise, or where torch.export fails, from torch.fx, where a
    submodule whose forward fx cannot trace keeps its BatchNorms unfolded (they run in float). A pair is folded only
    when the layer's output goes to the BatchNorm alone, each is called once and reads its own parameters, and, for a
    layer with a forward of its own, the folded layer computes what layer -> BatchNorm computed on a probe input."""
    source, model = model, copy.deepcopy(model).eval()
    if not any(isinstance(m, _BN) for m in model.modules()):
        return model
    pairs = None
    if input_shape is not None:  # the pairs depend on the model's structure only: traced once per model and shape
        try:
            known = _EXPORTED_PAIRS.setdefault(source, {})
        except TypeError:  # a model that cannot be a weak dictionary key (unhashable): no cache
            known = {}
        key = tuple(int(v) for v in input_shape)
        if key not in known:
            known[key] = _exported_pairs(model, key)
        pairs = known[key]
    for layer_name, bn_name in (_traced_pairs(model) if pairs is None else pairs):
        _fold_pair(model, layer_name, bn_name)
    return model


_EXPORTED_PAIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {input shape: pairs or None}


def _pair_types_fit(layer: nn.Module | None, bn: nn.Module | None) -> bool:
    if not isinstance(bn, _BN) or not bn.track_running_stats or bn.running_mean is None \
            or bn.num_features != getattr(getattr(layer, "weight", None), "shape", (None,))[0]:
        return False
    return isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) or \
        isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)


def _exported_pairs(model: nn.Module, input_shape) -> list[tuple[str, str]] | None:
    """(layer, BatchNorm) names from torch.export's graph of `model` on a 2×`input_shape` input; None if it fails."""
    try:
        ep = torch.export.export(model, (torch.rand(2, *input_shape),))
    except Exception:  # noqa: BLE001  (the model's code: fall back to torch.fx)
        return None
    sig = ep.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    modules = dict(model.named_modules())

    def owner(arg, attr):  # the module whose `attr` the node argument is, or None
        name = fqn.get(getattr(arg, "name", None), "") if arg is not None else ""
        return name[: -len(attr) - 1] if name.endswith("." + attr) else None

    pairs = []
    for n in ep.graph.nodes:
        if n.op != "call_function" or "batch_norm" not in str(n.target) or len(n.args) < 5:
            continue
        src = n.args[0]
        if getattr(src, "op", None) != "call_function" or len(src.users) != 1 or len(src.args) < 2 \
                or not any(k in str(src.target) for k in ("conv2d", "linear")):
            continue
        layer_name, bn_name = owner(src.args[1], "weight"), owner(n.args[3], "running_mean")
        if layer_name is None or bn_name is None or owner(n.args[4], "running_var") != bn_name:
            continue
        bias = src.args[2] if len(src.args) > 2 else src.kwargs.get("bias")
        if bias is not None and owner(bias, "bias") != layer_name:
            continue
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        val = src.meta.get("val")
        if not _pair_types_fit(layer, bn) or isinstance(layer, nn.Linear) and getattr(val, "dim", lambda: 2)() != 2:
            continue
        if len(src.args[1].users) != 1 or len(n.args[3].users) != 1:  # each called once
            continue
        pairs.append((layer_name, bn_name))
    return pairs


def _traced_pairs(model: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(layer, BatchNorm) names from a torch.fx trace (Conv2d, Linear and BatchNorm are leaves; a submodule whose
    forward cannot be traced becomes a leaf too, and its children are traced one by one)."""
    from torch import fx

    class Tracer(fx.Tracer):
        def __init__(self):
            super().__init__()
            self.untraceable: list[nn.Module] = []

        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d, nn.Linear, _BN)) or any(m is u for u in self.untraceable) or \
                super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            if self.is_leaf_module(m, self.path_of_module(m)):
                return super().call_module(m, forward, args, kwargs)
            nodes, depth = len(self.graph.nodes), len(self.module_stack)
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:  # noqa: BLE001  (untraceable: undo what it traced, call it as one node)
                for node in reversed(list(self.graph.nodes)[nodes:]):
                    self.graph.erase_node(node)
                while len(self.module_stack) > depth:
                    self.module_stack.popitem()
                self.untraceable.append(m)
                return super().call_module(m, forward, args, kwargs)

    tracer = Tracer()
    try:
        graph = tracer.trace(model)
        graph.lint()
    except Exception:  # noqa: BLE001  (the model's own forward cannot be traced: try its children)
        return [p for name, child in model.named_children() if not isinstance(child, (nn.Conv2d, nn.Linear, _BN))
                for p in _traced_pairs(child, f"{prefix}{name}.")]
    paths = {id(m): n for n, m in model.named_modules()}
    pairs = []
    for u in tracer.untraceable:
        pairs += [p for name, child in u.named_children() if not isinstance(child, (nn.Conv2d, nn.Linear, _BN))
                  for p in _traced_pairs(child, f"{prefix}{paths[id(u)]}.{name}.")]
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
    for n in graph.nodes:
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            continue
        src = n.args[0]
        if src.op != "call_module" or len(src.users) != 1 or calls[n.target] != 1 or calls[src.target] != 1:
            continue
        if not _pair_types_fit(modules.get(src.target), modules.get(n.target)):
            continue
        if any(a == t or a.startswith(t + ".") for a in attrs for t in (n.target, src.target)):
            continue  # the forward reads their parameters directly
        pairs.append((prefix + src.target, prefix + n.target))
    return pairs


def _fold_pair(model: nn.Module, layer_name: str, bn_name: str) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    except AttributeError:  # the model changed since its pairs were traced
        return
    if not _pair_types_fit(layer, bn):
        return
    ones, zeros = torch.ones_like(bn.running_mean), torch.zeros_like(bn.running_mean)
    w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight if bn.weight is not None else ones,
                                bn.bias if bn.bias is not None else zeros)
    if _own_forward(type(layer)):  # fold only if the layer's own forward then computes what layer -> bn computed
        folded = copy.deepcopy(layer)
        folded.weight, folded.bias = w, b
        try:
            x = _probe_input(layer, None)
            with torch.no_grad():
                ok = torch.allclose(folded(x), bn(layer(x)), rtol=1e-4, atol=1e-4)
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            return
    layer.weight, layer.bias = w, b
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if m is bn:
            _set_submodule(model, name, nn.Identity())


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_model(model: nn.Module, policy: QuantPolicy, specs, fold_bn: bool = True,
                   method: str = "percentile", skip_unsupported: bool = False,
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A fake-quant copy of `model`: each Conv2d/Linear (subclasses included) the policy gives bits becomes a
    fake-quant layer, quantized by `method` (export/quantize/quantizers.py: percentile, minmax, pwlq, dorefa, pact,
    lsq; an unknown name raises UnknownNameError); a subclass keeps its class, attributes and forward. BatchNorms
    are folded first (fold_batchnorm, traced on a 2×`input_shape` input when given) unless `fold_bn` is False.
    A layer the quantizer cannot take (unsupported_reason) raises one UnsupportedOpError naming every such layer and
    why; with `skip_unsupported` each stays in float with an UnsupportedLayerWarning, and `float_layers(qmodel)` lists
    them. Call `calibrate` before use."""
    get_quantizer(method)
    policy.validate(specs)
    qmodel = fold_batchnorm(model, input_shape) if fold_bn else copy.deepcopy(model).eval()
    modules = dict(qmodel.named_modules())
    todo, refused = [], {}
    for spec in specs:
        bits = policy.bits(spec.name)
        if bits is None:
            continue
        mod = modules.get(spec.name)
        reason = "the model has no module of that name" if mod is None else unsupported_reason(mod, spec)
        if reason is None:
            todo.append((spec.name, mod, bits))
        else:
            refused[spec.name] = f"{type(mod).__name__}: {reason}" if mod is not None else reason
    if refused and not skip_unsupported:
        listed = "; ".join(f"layer {n} ({r})" for n, r in list(refused.items())[:4])
        more = f"; and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise UnsupportedOpError(f"cannot quantize {listed}{more}. Leave {'it' if len(refused) == 1 else 'them'} in "
                                 f"float with skip_unsupported=True, or give {'it' if len(refused) == 1 else 'them'} "
                                 f"no bits in the policy")
    for name, reason in refused.items():
        warnings.warn(f"layer {name} is left in float: {reason}", UnsupportedLayerWarning, stacklevel=2)
    for name, mod, bits in todo:
        new = quantize_layer(mod, bits, method)
        if new is not mod:
            for alias, m in list(qmodel.named_modules(remove_duplicate=False)):
                if m is mod:
                    _set_submodule(qmodel, alias, new)
    qmodel.arq_float_layers = dict(refused)
    return qmodel


def float_layers(qmodel: nn.Module) -> dict[str, str]:
    """{layer: why} of the layers quantize_model(..., skip_unsupported=True) left in float."""
    return dict(getattr(qmodel, "arq_float_layers", {}))


def quant_layers(model: nn.Module) -> dict[str, _QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def model_quantizer(model: nn.Module) -> str | None:
    """The quantization method of a fake-quant model's layers ("a+b" if they differ), None without any."""
    names = sorted({m.method for m in quant_layers(model).values()})
    return "+".join(names) if names else None


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor], percentile: float = 99.99) -> nn.Module:
    """Set every activation quantizer's range from float forward passes over `batches` (N×C×H×W tensors).

    For a smoothing base model pass noisy batches x + σ·ε: noise widens activation ranges (TOOLCHAIN.md)."""
    layers = quant_layers(qmodel)
    qmodel.eval()
    batches = list(batches)
    for i, m in enumerate(layers.values()):
        m.calib_index = i  # picks the layer's tie-free scale widening (export/quantize/quantizers.tie_free_widening)
        m.start_calibration()
    try:
        for xb in batches:
            qmodel(xb)
    finally:
        for m in layers.values():
            m.finish_calibration(percentile)
    break_ties(qmodel, batches)
    return qmodel


# A value x/s exactly half-way between two integers is a rounding tie, and each runtime breaks it by its own float
# rounding (torch, onnxruntime and TVM sum in different orders), so one activation moves by a whole step in one and
# not in another. Random values sit that close to a tie about once per 10^6; a layer whose scale is commensurate with
# the integer lattice its input lies on (the previous layers' s_in·s_w,c·Z) has a fixed share of ties in one channel
# (1/136 and 1/232 seen). export/quantize/quantizers.tie_free_widening prevents most at calibration; QAT can drift back.
TIE_ULPS = 4  # |x/s - (k + 1/2)| within this many float32 ulps of x/s is a tie
TIE_RATE, TIE_MIN_HITS = 2e-3, 4  # a channel with at least this share and count of ties is commensurate
TIE_NUDGE = 1.0 + 3 * 2.0**-13  # 0.04 %: moves a tie by about 2·10^-4·|x/s|, far beyond float rounding


@torch.no_grad()
def tie_report(qmodel: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, dict]:
    """Per quantized layer, over the quantized model's forward passes on `batches`: the channel of its input with
    the largest share of rounding ties: {"channel", "ties", "values", "rate"} (values inside the quantizer's range)."""
    layers = quant_layers(qmodel)
    hits = {n: None for n in layers}
    totals = {n: None for n in layers}

    def hook(name, layer):
        def f(_mod, inp):
            x = inp[0].detach().float()
            s = float(layer.quantizer.act_scale(layer).detach())
            z = float(layer.a_zero_point)
            v = x / s
            inside = (v >= -z - 0.5) & (v <= layer.a_qmax - z + 0.5)
            tol = TIE_ULPS * torch.finfo(torch.float32).eps * v.abs().clamp_min(1.0)
            tie = inside & ((v - torch.floor(v) - 0.5).abs() <= tol)
            dims = [d for d in range(x.dim()) if d != 1]
            h, t = tie.sum(dim=dims), inside.sum(dim=dims)
            hits[name] = h if hits[name] is None else hits[name] + h
            totals[name] = t if totals[name] is None else totals[name] + t
        return f

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    was_training = qmodel.training
    qmodel.eval()
    try:
        for xb in batches:
            qmodel(xb)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    out = {}
    for n in layers:
        if hits[n] is None:
            continue
        rate = hits[n].double() / totals[n].clamp_min(1).double()
        c = int(torch.argmax(rate))
        out[n] = {"channel": c, "ties": int(hits[n][c]), "values": int(totals[n][c]), "rate": float(rate[c])}
    return out


def _commensurate(row: dict) -> bool:
    return row["ties"] >= TIE_MIN_HITS and row["rate"] >= TIE_RATE


@torch.no_grad()
def break_ties(qmodel: nn.Module, batches: Iterable[torch.Tensor], rounds: int = 8) -> dict[str, int]:
    """Nudge (×TIE_NUDGE, zero point kept) the activation scale of every layer whose input has a channel full of
    rounding ties, re-measuring after each round, so torch, onnxruntime and TVM compute the same integers.
    Returns {layer: nudges} for the layers it changed; raises nothing (a layer still tied after `rounds` stays)."""
    batches = list(batches)
    layers = quant_layers(qmodel)
    nudged: dict[str, int] = {}
    for _ in range(rounds):
        tied = [n for n, row in tie_report(qmodel, batches).items() if _commensurate(row)]
        if not tied:
            break
        for n in tied:
            layers[n].quantizer.rescale_act(layers[n], TIE_NUDGE)
            nudged[n] = nudged.get(n, 0) + 1
            layers[n].tie_nudges = getattr(layers[n], "tie_nudges", 0) + 1  # what the export report lists
    return nudged


def tie_nudges(qmodel: nn.Module) -> dict[str, int]:
    """{layer: times break_ties nudged its scale} in this process (calibration and export)."""
    return {n: m.tie_nudges for n, m in quant_layers(qmodel).items() if getattr(m, "tie_nudges", 0)}


def set_quant_enabled(qmodel: nn.Module, enabled: bool) -> None:
    for m in quant_layers(qmodel).values():
        m.quant_enabled = enabled


def calibration_batches(x: torch.Tensor, sigma: float, batch_size: int = 128, copies: int = 1, seed: int = 0):
    """Yield batches of x (and `copies` noisy copies x + σ·ε when σ > 0), seeded."""
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if sigma > 0:
            for _ in range(copies):
                yield xb + sigma * torch.randn(xb.shape, generator=g)
        else:
            yield xb
