"""LLVM vector IR for numba ``@intrinsic`` kernels: 16-lane float32 / int32 vectors.

A kernel that LLVM's auto-vectorizer will not vectorize (butterflies across lanes, an
argmin carried in registers) emits its vector code through these helpers; LLVM compiles
it for the host (AVX-512, or split into AVX2 halves / SSE quarters). Used by the RHT
(fedquant.hadamard_numba) and the VQ search (fedquant.vq_kernel). Without numba only
LANES exists.
"""

from __future__ import annotations

from fedquant._numba import AVAILABLE

LANES = 16  # floats per vector (512 bits; LLVM splits it on narrower machines)

if AVAILABLE:
    from llvmlite import ir
    from numba.core import cgutils

    F32 = ir.FloatType()
    I32 = ir.IntType(32)
    VEC = ir.VectorType(F32, LANES)
    LANE_IDX = ir.VectorType(I32, LANES)


def array_data(context, builder, arrty, arr) -> ir.Value:
    """The data pointer of a numba array argument."""
    return context.make_array(arrty)(context, builder, arr).data


def vector_ptr(context, builder, arrty, arr, index) -> ir.Value:
    """Pointer to the 16 floats at a[index] (the caller guarantees they exist)."""
    data = array_data(context, builder, arrty, arr)
    return builder.bitcast(builder.gep(data, [index]), VEC.as_pointer())


def call(builder, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
    """A call of the LLVM intrinsic `name` (e.g. "llvm.fma.v16f32")."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def fma(builder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a * b + c on 16 floats, rounded once."""
    return call(builder, "llvm.fma.v16f32", VEC, [a, b, c])


def splat(builder, scalar: ir.Value) -> ir.Value:
    """A 16-lane vector of `scalar` (float32 or int32)."""
    vty = ir.VectorType(scalar.type, LANES)
    undef = ir.Constant(vty, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(LANE_IDX, [0] * LANES))
