"""Weights outside the library: lift a Relax function's integer constants into parameters after its input.

    lift_weights(mod) -> (mod, [(name, array), ...])

After integer lowering (`arq_deploy.targets.int_lowering`) every layer's weights and int32 biases are integer
constants of `main`: the conv kernels' packed words (`int_kernels.packed_weights`), int8/int16 weights of the plain
integer conv2d and dense layers, int32 biases. Compiled as they are, they sit in the library at their container
types (8 bits per weight or more). Lifted, `main(x, w0, w1, ...)` takes them as arguments (attrs["num_input"] = the
original parameters), the library holds none of them, and the artifact stores them bit-packed
(`arq_deploy.core.weights`); runners unpack them once and pass them on every call. Only integer tensors of at least
`min_elements` values are lifted: scalars (zero points), float requantization multipliers and the float weights of
layers that were not lowered stay in the library. The computation is unchanged: each TIR function reads the same
buffer, now an argument instead of a constant, so results are bit-identical.
"""

from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 16


def lift_weights(mod, min_elements: int = MIN_ELEMENTS, func_name: str = "main"):
    """(new module, [(param name, numpy array), ...] in parameter order) with the integer constants of
    `mod[func_name]` that have at least min_elements values turned into parameters after the existing ones. The same
    constant object used twice becomes one parameter. The input module is not modified."""
    import tvm
    from tvm import relax

    lifted: list[tuple[str, np.ndarray]] = []
    params: list = []
    by_const: dict = {}

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_generic_const_(self, c):
            if not isinstance(c, tvm.ir.expr.Constant):
                return c
            key = c
            if key in by_const:
                return by_const[key]
            arr = c.value.numpy()
            if arr.dtype.kind not in "iu" or arr.size < min_elements:
                return c
            name = f"w{len(lifted)}"
            var = relax.Var(name, relax.TensorType([int(d) for d in arr.shape], arr.dtype.name))
            by_const[key] = var
            lifted.append((name, np.ascontiguousarray(arr)))
            params.append(var)
            return var

    gv = mod.get_global_var(func_name)
    func = mod[gv]
    new = _Lift(mod).visit_expr(func)
    if not lifted:
        return mod, []
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
    out_func = relax.Function([*new.params, *params], new.body, new.ret_ty if hasattr(new, "ret_ty") else None,
                              is_pure=new.is_pure, attrs=new.attrs).with_attr("num_input", n_in)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[gv] = out_func
    return out, lifted
