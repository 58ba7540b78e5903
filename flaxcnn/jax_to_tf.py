"""A JAX image function as a TensorFlow graph of plain TF ops, with a dynamic batch axis.

``jax2tf`` in the installed JAX only serialises StableHLO into one ``XlaCallModule`` op. TF
Lite can lower that op, but with a symbolic batch each bias add and activation becomes a
``BROADCAST_TO`` to a run-time shape that its optimiser cannot fold (the default model: 80 of
them, and 63 ``ADD`` s, 35 ``MAXIMUM`` s and 35 ``MINIMUM`` s left beside the convolutions), where a
fixed batch lets the converter fuse BatchNorm, bias and ReLU6 into the convolutions for
XNNPACK. A fixed batch is no answer either (the artifact takes any ``N``). So this module
translates the jaxpr itself, primitive by primitive, into the TF ops Keras would have
produced: ``Conv2D``, ``DepthwiseConv2dNative``, ``MatMul``, ``AddV2`` with implicit
broadcasting, ``Minimum(Maximum(x, 0), 6)`` that the converter fuses as ReLU6.

How the batch axis stays dynamic: the function is traced at a marker batch size
(:data:`BATCH_MARKER`, a prime no CNN has as a width or channel count); every axis of that
size is the batch, written ``-1`` or ``tf.shape(images)[0]`` in the graph. A size that is a
multiple of it (the batch merged into another axis) has no TF translation and is refused.
Everything that does not depend on the images (BatchNorm folded into kernels, rsqrt of the
variances) is computed once in JAX, in one compiled program, and enters the graph as
constants (large ones as ``tf.Variable`` s, so a SavedModel keeps them out of its GraphDef).

Only what inference CNNs use is translated; anything else raises
:class:`UnsupportedPrimitiveError` naming the primitive. ``flaxcnn.export`` checks every
conversion numerically against the JAX model, so a wrong translation cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

BATCH_MARKER = 7919  # the 1000th prime: the traced batch size, recognised in every shape
_VARIABLE_MIN_SIZE = 1024  # constants with at least this many elements become tf.Variables
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))  # fmt: skip
# Calls whose body is inlined, and the parameter holding it.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}  # fmt: skip
_IDENTITY = ("copy", "copy_p", "optimization_barrier")
_FOLDED = object()  # pass 2's stand-in for a value computed in pass 1 (see _Translation)


class UnsupportedPrimitiveError(ValueError):
    """The function uses an operation this translation has no TF equivalent for."""


class _Tensor:
    """A TF tensor and the shape of the JAX value it stands for (batch axis = marker).

    ``shape`` may be smaller than ``aval_shape`` along some axes (size 1 there): a broadcast
    left to the consumer, which TF's elementwise ops do implicitly (see ``_broadcast_in_dim``).
    """

    def __init__(self, tensor: Any, shape: Sequence[int], aval_shape: Sequence[int]):
        self.tensor, self.shape, self.aval_shape = tensor, tuple(shape), tuple(aval_shape)


class _Translation:
    """One walk over the jaxpr; ``fold_values`` switches between the two passes.

    Pass 1 (``fold_values is None``) runs inside ``jax.jit`` with no TF at all: values that
    do not depend on the images are JAX tracers, and each one a TF op will read is recorded
    in ``self.folded``. Pass 2 builds the TF graph and takes those values, computed by that
    one jitted program, in the same order.
    """

    def __init__(self, tf: Any, batch: Any, fold_values: list | None, variables: list):
        self.tf, self.batch, self.variables = tf, batch, variables
        self.fold_values = None if fold_values is None else iter(fold_values)
        self.folded: list = []
        self.variables_used = 0

    # -- values -----------------------------------------------------------------------

    def constant(self, value: Any) -> Any:
        """A folded value as a TF tensor (pass 2) or a recorded tracer (pass 1)."""
        if self.fold_values is None:
            self.folded.append(value)
            return None
        value = np.asarray(next(self.fold_values))
        tf = self.tf
        if value.size < _VARIABLE_MIN_SIZE:
            return tf.constant(value)
        # tf.function traces twice on its first call; the second trace reuses the variables.
        if self.variables_used == len(self.variables):
            with tf.init_scope():  # created outside the traced graph, kept by the module
                self.variables.append(tf.Variable(value, trainable=False))
        self.variables_used += 1
        return self.variables[self.variables_used - 1]

    def dynamic(self, shape: Sequence[int]) -> list:
        """A shape for a TF op: the marker replaced by the run-time batch size."""
        return [self.batch if d == BATCH_MARKER else d for d in shape]

    # -- the walk ---------------------------------------------------------------------

    def run(self, jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
        """The outputs of ``jaxpr``: ``_Tensor`` s, or folded values (``_FOLDED`` in pass 2)."""
        env: dict = {}
        producers: dict = {}
        as_tf: dict = {}  # folded atom -> its _Tensor, made once per jaxpr invocation

        def read(atom):
            return atom.val if isinstance(atom, core.Literal) else env[atom]

        def read_tf(atom):
            value = read(atom)
            if isinstance(value, _Tensor) or value is None:
                return value
            key = id(atom) if isinstance(atom, core.Literal) else atom
            if key not in as_tf:
                shape = tuple(atom.aval.shape)
                as_tf[key] = _Tensor(self.constant(value), shape, shape)
            return as_tf[key]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        for eqn in jaxpr.eqns:
            values = [read(a) for a in eqn.invars]
            name = eqn.primitive.name
            if name in _CALLS:
                body = eqn.params[_CALLS[name]]
                body, body_consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (
                    body, ())  # fmt: skip
                outs = self.run(body, body_consts, values)
            elif not any(isinstance(v, _Tensor) or v is None for v in values) and not any(
                BATCH_MARKER in v.aval.shape for v in eqn.outvars
            ):  # fmt: skip
                if self.fold_values is None:  # pass 1: computed by the jitted program
                    outs = eqn.primitive.bind(*values, **eqn.params)
                    outs = outs if eqn.primitive.multiple_results else [outs]
                else:  # pass 2: taken from its results where a TF op reads them
                    outs = [_FOLDED] * len(eqn.outvars)
            else:
                inputs = [read_tf(a) for a in eqn.invars]
                outs = self.translate(eqn, inputs, producers, read_tf)
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
                producers[var] = eqn
        outs = [read(a) for a in jaxpr.outvars]
        return [read_tf(a) if isinstance(v, _Tensor) or v is None else v
                for a, v in zip(jaxpr.outvars, outs, strict=True)]  # fmt: skip

    def translate(self, eqn, inputs: list, producers: dict, read_tf) -> list:
        name = eqn.primitive.name
        out_shapes = [v.aval.shape for v in eqn.outvars]
        for shape in out_shapes:
            if any(d != BATCH_MARKER and d % BATCH_MARKER == 0 for d in shape):
                raise UnsupportedPrimitiveError(
                    f"{name} merges the batch axis into another axis (shape {shape})")
        if self.fold_values is None:  # pass 1 records the folded inputs only
            return [None] * len(eqn.outvars)
        if name in _IDENTITY:
            return inputs
        rule = _RULES.get(name)
        if rule is None:
            raise UnsupportedPrimitiveError(f"no TensorFlow translation for the JAX primitive "
                                            f"{name!r}")  # fmt: skip
        if name == "erfc":  # see _erfc: GELU's erfc(-x * c) is written as TF Lite's pattern
            source = None if isinstance(eqn.invars[0], core.Literal) else producers.get(
                eqn.invars[0])  # fmt: skip
            operand = None if source is None or source.primitive.name != "mul" else (
                producers.get(source.invars[0]))  # fmt: skip
            negated = operand is not None and operand.primitive.name == "neg"
            if negated:
                x = read_tf(operand.invars[0])
                scale = read_tf(source.invars[1])
                return [_Tensor(1.0 + self.tf.math.erf(x.tensor * scale.tensor), x.shape,
                                out_shapes[0])]  # fmt: skip
        out = rule(self, eqn.params, *inputs)
        if eqn.primitive.multiple_results:
            return [_Tensor(t, s, s) for t, s in zip(out, out_shapes, strict=True)]
        if isinstance(out, _Tensor):
            return [out]
        return [_Tensor(out, out_shapes[0], out_shapes[0])]

    def full(self, value: _Tensor) -> Any:
        """The tensor at its full shape (an implicit broadcast made explicit)."""
        if value.shape == value.aval_shape:
            return value.tensor
        return self.tf.broadcast_to(value.tensor, self.dynamic(value.aval_shape))


# ---------------------------------------------------------------------------- rules


def _elementwise(tf_op: Callable) -> Callable:
    def rule(t: _Translation, params, *xs: _Tensor) -> _Tensor:
        shape = tuple(np.broadcast_shapes(*(x.shape for x in xs)))
        aval = tuple(np.broadcast_shapes(*(x.aval_shape for x in xs)))
        return _Tensor(tf_op(t.tf, *(x.tensor for x in xs)), shape, aval)

    return rule


def _integer_pow(t: _Translation, params, x: _Tensor) -> _Tensor:
    y = params["y"]
    if y == 2:
        return _Tensor(t.tf.square(x.tensor), x.shape, x.aval_shape)
    if not 1 <= abs(y) <= 4:
        raise UnsupportedPrimitiveError(f"integer_pow with exponent {y}")
    out = x.tensor
    for _ in range(abs(y) - 1):
        out = out * x.tensor
    return _Tensor(out if y > 0 else 1.0 / out, x.shape, x.aval_shape)


def _select_n(t: _Translation, params, which: _Tensor, *cases: _Tensor) -> _Tensor:
    if len(cases) != 2:
        raise UnsupportedPrimitiveError(f"select_n with {len(cases)} cases")
    shape = tuple(np.broadcast_shapes(which.shape, *(c.shape for c in cases)))
    aval = tuple(np.broadcast_shapes(which.aval_shape, *(c.aval_shape for c in cases)))
    return _Tensor(t.tf.where(which.tensor, cases[1].tensor, cases[0].tensor), shape, aval)


def _clamp(t: _Translation, params, low: _Tensor, x: _Tensor, high: _Tensor) -> _Tensor:
    tf = t.tf
    return _Tensor(tf.minimum(tf.maximum(x.tensor, low.tensor), high.tensor), x.shape,
                   x.aval_shape)  # fmt: skip


def _convert(t: _Translation, params, x: _Tensor) -> _Tensor:
    dtype = t.tf.as_dtype(np.dtype(params["new_dtype"]))
    return _Tensor(t.tf.cast(x.tensor, dtype), x.shape, x.aval_shape)


def _broadcast_in_dim(t: _Translation, params, x: _Tensor) -> _Tensor:
    """Only the rank is made up (size-1 axes); the broadcast itself is left to the consumer."""
    out, dims = params["shape"], params["broadcast_dimensions"]
    expanded = [1] * len(out)
    for axis, dim in zip(dims, x.shape, strict=True):
        expanded[axis] = dim
    tensor = x.tensor
    if tuple(expanded) != x.shape:
        target = [-1 if d == BATCH_MARKER else d for d in expanded]
        tensor = t.tf.reshape(tensor, target)
    return _Tensor(tensor, expanded, out)


def _reshape(t: _Translation, params, x: _Tensor) -> Any:
    if params.get("dimensions") is not None:
        raise UnsupportedPrimitiveError("reshape with a dimension permutation")
    sizes = params["new_sizes"]
    if list(sizes).count(BATCH_MARKER) > 1:
        raise UnsupportedPrimitiveError(f"reshape to {sizes}: two batch-sized axes")
    return t.tf.reshape(t.full(x), [-1 if d == BATCH_MARKER else d for d in sizes])


def _squeeze(t: _Translation, params, x: _Tensor) -> Any:
    return t.tf.squeeze(t.full(x), axis=list(params["dimensions"]))


def _transpose(t: _Translation, params, x: _Tensor) -> Any:
    return t.tf.transpose(t.full(x), list(params["permutation"]))


def _reduce(tf_name: str) -> Callable:
    def rule(t: _Translation, params, x: _Tensor) -> Any:
        return getattr(t.tf, tf_name)(t.full(x), axis=list(params["axes"]))

    return rule


def _argmax(t: _Translation, params, x: _Tensor) -> Any:
    (axis,) = params["axes"]
    return t.tf.argmax(t.full(x), axis=axis, output_type=t.tf.as_dtype(params["index_dtype"]))


def _nhwc_padding(in_hw, window, strides, pads) -> str | None:
    """'SAME' or 'VALID' if the explicit ``pads`` are exactly those, else ``None``."""
    pads = tuple(tuple(p) for p in pads)
    if all(p == (0, 0) for p in pads):
        return "VALID"
    same = lax.padtype_to_pads(tuple(in_hw), tuple(window), tuple(strides), "SAME")
    return "SAME" if tuple(tuple(p) for p in same) == pads else None


def _pad_nhwc(t: _Translation, x: Any, pads, value: float = 0.0) -> Any:
    return t.tf.pad(x, [[0, 0], *map(list, pads), [0, 0]], constant_values=value)


def _conv(t: _Translation, params, lhs: _Tensor, rhs: _Tensor) -> Any:
    tf = t.tf
    if (tuple(params["dimension_numbers"]) != tuple(_NHWC) or params["batch_group_count"] != 1
            or any(d != 1 for d in params["lhs_dilation"])):  # fmt: skip
        raise UnsupportedPrimitiveError(
            "conv_general_dilated other than NHWC/HWIO without input dilation")
    x, kernel = t.full(lhs), t.full(rhs)
    kh, kw, kin, kout = rhs.aval_shape
    strides, dilation = tuple(params["window_strides"]), tuple(params["rhs_dilation"])
    window = [(k - 1) * d + 1 for k, d in zip((kh, kw), dilation, strict=True)]
    padding = _nhwc_padding(lhs.aval_shape[1:3], window, strides, params["padding"])
    if padding is None:
        x, padding = _pad_nhwc(t, x, params["padding"]), "VALID"
    groups, channels = params["feature_group_count"], lhs.aval_shape[3]
    if groups == 1:
        return tf.nn.conv2d(x, kernel, strides=[1, *strides, 1], padding=padding,
                            dilations=[1, *dilation, 1])  # fmt: skip
    if groups == channels and kin == 1 and strides[0] == strides[1]:
        # lax's output channel o reads input channel o // multiplier: TF's depthwise order.
        kernel = tf.reshape(kernel, [kh, kw, channels, kout // channels])
        return tf.nn.depthwise_conv2d(x, kernel, strides=[1, *strides, 1], padding=padding,
                                      dilations=list(dilation))  # fmt: skip
    raise UnsupportedPrimitiveError(f"grouped convolution ({groups} groups of {kin} channels)")


def _dot_general(t: _Translation, params, lhs: _Tensor, rhs: _Tensor) -> Any:
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    x, y = t.full(lhs), t.full(rhs)
    if not lb and len(lhs.aval_shape) == 2 and len(rhs.aval_shape) == 2 and tuple(lc) == (1,):
        return t.tf.matmul(x, y, transpose_b=tuple(rc) == (1,))
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    left = [next(letters) for _ in lhs.aval_shape]
    right = [next(letters) for _ in rhs.aval_shape]
    for i, j in zip((*lb, *lc), (*rb, *rc), strict=True):
        right[j] = left[i]
    batch = [left[i] for i in lb]
    out = batch + [c for i, c in enumerate(left) if i not in (*lb, *lc)]
    out += [c for j, c in enumerate(right) if j not in (*rb, *rc)]
    return t.tf.einsum(f"{''.join(left)},{''.join(right)}->{''.join(out)}", x, y)


def _pad(t: _Translation, params, x: _Tensor, value: _Tensor) -> Any:
    config = params["padding_config"]
    if any(interior or lo < 0 or hi < 0 for lo, hi, interior in config):
        raise UnsupportedPrimitiveError("pad with interior or negative padding")
    return t.tf.pad(t.full(x), [[lo, hi] for lo, hi, _ in config],
                    constant_values=t.tf.reshape(value.tensor, []))  # fmt: skip


def _reduce_window(kind: str) -> Callable:
    def rule(t: _Translation, params, x: _Tensor) -> Any:
        tf = t.tf
        window, strides = params["window_dimensions"], params["window_strides"]
        dilated = any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
        pads = params["padding"]
        pooling_2d = len(window) == 4 and (window[0], window[3], strides[0], strides[3]) == (
            1, 1, 1, 1) and tuple(pads[0]) == tuple(pads[3]) == (0, 0)  # fmt: skip
        if not pooling_2d or dilated:
            raise UnsupportedPrimitiveError(f"reduce_window_{kind} other than 2-D pooling")
        value = t.full(x)
        padding = _nhwc_padding(x.aval_shape[1:3], window[1:3], strides[1:3], pads[1:3])
        if kind == "sum" or padding is None:  # TF's SAME average excludes the padding
            fill = -np.inf if kind == "max" else 0.0
            value, padding = _pad_nhwc(t, value, pads[1:3], fill), "VALID"
        ksize, stride = [1, *window[1:3], 1], [1, *strides[1:3], 1]
        if kind == "max":
            return tf.nn.max_pool2d(value, ksize, stride, padding)
        return tf.nn.avg_pool2d(value, ksize, stride, padding) * float(window[1] * window[2])

    return rule


def _slice(t: _Translation, params, x: _Tensor) -> Any:
    start, limit = params["start_indices"], params["limit_indices"]
    strides = params["strides"] or (1,) * len(start)
    end_mask = 0
    for axis, (lo, hi, step, size) in enumerate(zip(start, limit, strides, x.aval_shape,
                                                    strict=True)):  # fmt: skip
        if size == BATCH_MARKER:
            if (lo, hi, step) != (0, BATCH_MARKER, 1):
                raise UnsupportedPrimitiveError("slice along the batch axis")
            end_mask |= 1 << axis
    end = [0 if d == BATCH_MARKER else d for d in limit]
    return t.tf.strided_slice(t.full(x), list(start), end, list(strides), end_mask=end_mask)


def _concatenate(t: _Translation, params, *xs: _Tensor) -> Any:
    return t.tf.concat([t.full(x) for x in xs], axis=params["dimension"])


def _rev(t: _Translation, params, x: _Tensor) -> Any:
    return t.tf.reverse(t.full(x), axis=list(params["dimensions"]))


def _split(t: _Translation, params, x: _Tensor) -> list:
    return t.tf.split(t.full(x), list(params["sizes"]), axis=params["axis"])


def _erfc(t: _Translation, params, x: _Tensor) -> _Tensor:
    # TF Lite has no Erf/Erfc kernel, but it fuses 0.5 * x * (1 + erf(x * c)) into GELU;
    # jax.nn.gelu's erfc(-x * c) is rewritten into that form in _Translation.translate.
    return _Tensor(1.0 - t.tf.math.erf(x.tensor), x.shape, x.aval_shape)


_UNARY = {"neg": "negative", "exp": "exp", "log": "math.log", "log1p": "math.log1p",
          "tanh": "tanh", "logistic": "sigmoid", "rsqrt": "math.rsqrt", "sqrt": "sqrt",
          "abs": "abs", "sign": "sign", "floor": "floor", "ceil": "math.ceil",
          "square": "square", "erf": "math.erf", "not": "logical_not",
          "is_finite": "math.is_finite", "sin": "sin", "cos": "cos"}  # fmt: skip
_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide",
           "max": "maximum", "min": "minimum", "pow": "pow", "atan2": "atan2", "eq": "equal",
           "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
           "ge": "greater_equal", "and": "logical_and", "or": "logical_or"}  # fmt: skip


def _tf_op(path: str) -> Callable:
    def op(tf, *xs):
        fn = tf
        for part in path.split("."):
            fn = getattr(fn, part)
        return fn(*xs)

    return op


_RULES: dict[str, Callable] = {
    **{name: _elementwise(_tf_op(op)) for name, op in {**_UNARY, **_BINARY}.items()},
    "integer_pow": _integer_pow, "select_n": _select_n, "clamp": _clamp,
    "convert_element_type": _convert, "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape, "squeeze": _squeeze, "transpose": _transpose,
    "reduce_sum": _reduce("reduce_sum"), "reduce_max": _reduce("reduce_max"),
    "reduce_min": _reduce("reduce_min"), "reduce_prod": _reduce("reduce_prod"),
    "argmax": _argmax, "conv_general_dilated": _conv, "dot_general": _dot_general,
    "pad": _pad, "reduce_window_max": _reduce_window("max"),
    "reduce_window_sum": _reduce_window("sum"), "slice": _slice,
    "concatenate": _concatenate, "rev": _rev, "split": _split, "erfc": _erfc,
}  # fmt: skip


SUPPORTED_PRIMITIVES = frozenset((*_RULES, *_CALLS, *_IDENTITY))

# ---------------------------------------------------------------------------- entry point


def to_tf_module(
    fn: Callable[[jax.Array], jax.Array], image_shape: Sequence[int], *, tf: Any,
    input_name: str = "images", output_name: str = "logits",
) -> Any:  # fmt: skip
    """Translates ``fn`` (float32 ``[N, *image_shape]`` -> ``[N, ...]``) into a ``tf.Module``.

    Args:
      fn: a JAX function of one batched float32 array (closing over its variables).
      image_shape: the input's shape without the batch axis (``(S, S, 3)``).
      tf: the ``tensorflow`` module (imported by the caller, GPUs hidden).
      input_name, output_name: the signature's input and output names.

    Returns:
      A ``tf.Module`` whose ``serve`` is a ``tf.function`` of ``images: float32[None,
      *image_shape]`` returning ``{output_name: ...}``, with the constants as its variables;
      ready for ``tf.saved_model.save`` and the TF Lite converter.

    Raises:
      UnsupportedPrimitiveError: ``fn`` uses an operation that has no translation here.
    """
    spec = jax.ShapeDtypeStruct((BATCH_MARKER, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(fn)(spec)
    if any(BATCH_MARKER in np.shape(c) for c in closed.consts) or BATCH_MARKER in image_shape:
        raise UnsupportedPrimitiveError(f"a constant or input axis has the marker size "
                                        f"{BATCH_MARKER}")  # fmt: skip

    def folded_constants(consts):  # pass 1: every image-independent value a TF op reads
        pass1 = _Translation(tf, None, None, [])
        pass1.run(closed.jaxpr, consts, [None])
        return pass1.folded

    fold_values = jax.device_get(jax.jit(folded_constants)(closed.consts))
    module = tf.Module()
    module.constants = []

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, *image_shape], tf.float32, name=input_name)])  # fmt: skip
    def serve(images):
        translation = _Translation(tf, tf.shape(images)[0], fold_values, module.constants)
        (out,) = translation.run(closed.jaxpr, closed.consts, [_Tensor(images, spec.shape,
                                                                        spec.shape)])  # fmt: skip
        return {output_name: translation.full(out)}

    serve.get_concrete_function()  # traces once: creates the variables, raises if unsupported
    module.serve = serve
    return module
