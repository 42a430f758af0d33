"""The Triton kernels built for real cards on this machine, no GPU needed (stnreg.fast.cuda_compile).

Triton's interpreter (tests/test_fast_cuda.py) runs the kernels' arithmetic but not the compiler:
a kernel that it runs may still fail to compile, spill registers, or get a data layout that makes
its gathers slow. These tests build every launch variant for an H100/H200 (sm_90) and read the
machine code.
"""

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler", allow_module_level=True)
try:
    from stnreg.fast import affine_cuda, cuda_compile
except ImportError as err:  # cuda_compile drives Triton's launcher internals, as of Triton 3.9
    pytest.skip(f"this Triton cannot build kernels ahead of time here: {err}", allow_module_level=True)


@pytest.fixture(scope="module")
def machines():
    return {v.name: cuda_compile.compile_variant(v) for v in cuda_compile.variants(affine_cuda)}


def test_every_kernel_variant_compiles_for_sm90_without_spills(machines):
    assert len(machines) == 12
    for name, m in machines.items():
        assert m.local_bytes == 0, f"{name}: {m.local_bytes} bytes of local memory per thread"
        # A gather kernel hides its memory latency with warps in flight: at least a quarter of a
        # multiprocessor's 64 warp slots (65536 registers) must fit.
        assert m.registers <= 65536 // (16 * 32), f"{name}: {m.registers} registers"


def test_gathers_take_one_column_per_thread(machines):
    # Triton lays a tile out for its widest vector access. If each thread held adjacent columns (so
    # that the output is stored in 16-byte pieces), one warp-wide gather would span four times as
    # many columns and touch about three times as many cache lines: every layout must hold one.
    for name, m in machines.items():
        assert m.size_per_thread, name
        assert all(s[-1] == 1 for s in m.size_per_thread), f"{name}: sizePerThread {m.size_per_thread}"


def test_forward_reads_eight_unmasked_corners_per_voxel(machines):
    # Every cell is clamped into the image, so no read needs a predicate: θ's 12 numbers once per
    # program, then 8 corners per voxel, and one store per voxel.
    for pad in ("zeros", "border"):
        m = machines[f"forward, {pad}"]
        assert cuda_compile.issued(m, lambda op: "LDG" in op) == 12 + 8 * m.variant.voxels
        assert cuda_compile.issued(m, lambda op: "LDG" in op and op.startswith("@")) == 0, "a predicated gather"
        assert cuda_compile.issued(m, lambda op: "STG" in op) == m.variant.voxels


def test_forward_compiles_for_sm80():
    forward = cuda_compile.variants(affine_cuda)[0]
    m = cuda_compile.compile_variant(forward, arch=80)
    assert m.local_bytes == 0 and any("LDG" in op for _, op in m.instructions)


def test_kernels_compile_for_several_channels():
    # The launches above have one channel, which Triton turns into a constant (no channel loop);
    # three channels keep the loop over channels in every kernel. The cell of each voxel stays live
    # across that loop, so registers run higher there (up to about 160, the fused NCC): no spills.
    for v in cuda_compile.variants(affine_cuda)[:6]:
        args = tuple(3 if type(a) is int and a == 1 else a for a in v.args)
        m = cuda_compile.compile_variant(cuda_compile.Variant(v.name, v.fn, args, v.constants, v.voxels))
        assert m.local_bytes == 0, (v.name, m.local_bytes)
        assert any("LDG" in op for _, op in m.instructions), v.name
