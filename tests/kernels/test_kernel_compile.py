"""Every kernel compiles for a real GPU (PTX and cubin for sm_90, through Triton's bundled
ptxas), also on a CPU-only machine. The interpreter runs the kernels' arithmetic but not the
compiler's checks (types of loop-carried values, constexpr branches, layouts), so this is the
CPU suite's guard for the native path.

The launchers are run on CPU tensors with every `@triton.jit` kernel of the module replaced by a
recorder (the logit losses' kernels are those of their shared skeleton, `row_loss.py`); each distinct (kernel, argument types, constexprs) launch is then compiled. This runs
in a subprocess: compiling needs TRITON_INTERPRET unset, and tests/conftest.py sets it.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

KERNEL_MODULES = ["kd", "dkd", "nkd", "ofa", "freq"]
_POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int64: "i64", torch.int32: "i32"}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_compile_for_gpu(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, __file__, module], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout, result.stdout


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **meta)` records the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((args, meta))


def _signature(kernel, args: tuple, constexprs: dict) -> dict:
    runtime = [p for p in kernel.params if not p.is_constexpr]
    signature = {}
    for param, value in zip(runtime, args):
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _POINTER_TYPES[value.dtype]
        else:
            signature[param.name] = "i64" if isinstance(value, int) else "fp32"
    return signature | {name: "constexpr" for name in constexprs}


def _run_launchers(name: str) -> None:
    """Representative launches: dtypes, one- and multi-block rows, dense and top-k teachers."""
    from fastkd.kernels import FUSED
    from fastkd.losses import topk_from_logits
    if name == "freq":
        for shape, dtype in [((2, 768, 7, 7), torch.bfloat16), ((2, 384, 14, 14), torch.float32)]:
            student = torch.randn(shape).to(dtype).requires_grad_()
            teacher = torch.randn(shape).to(dtype)
            losses = [FUSED["feature_mimic"](student, teacher)]
            losses += [FUSED["freq_decoupled"](student, teacher, dc, ac, dim)
                       for dim in ("spatial", "channel")
                       for dc, ac in [(0.3, 0.7), (0, 1.0), (1.0, 0)]]
            sum(losses).backward()
        return
    for classes, dtype, topk in [(1000, torch.bfloat16, 0), (21843, torch.float32, 0),
                                 (1000, torch.bfloat16, 10)]:
        student = torch.randn(2, classes).to(dtype).requires_grad_()
        teacher = torch.randn(2, classes).to(dtype)
        teacher = topk_from_logits(teacher, topk) if topk else teacher
        target = torch.zeros(2, dtype=torch.int64)
        args = (student, teacher) if name == "kd" else (student, teacher, target)
        FUSED[name](*args).backward()


def compile_module(name: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"fastkd.kernels.{'freq' if name == 'freq' else 'row_loss'}")
    recorders = {attr: _Recorder(kernel) for attr, kernel in vars(module).items()
                 if isinstance(kernel, triton.runtime.JITFunction) and attr.endswith("_kernel")}
    for attr, recorder in recorders.items():
        setattr(module, attr, recorder)
    _run_launchers(name)
    compiled = set()
    for recorder in recorders.values():
        assert recorder.launches, f"{recorder.kernel.fn.__name__} was never launched"
        for args, meta in recorder.launches:
            meta = dict(meta)
            num_warps = meta.pop("num_warps")
            signature = _signature(recorder.kernel, args, meta)
            key = (recorder.kernel.fn.__name__, tuple(signature.items()), tuple(meta.items()))
            if key in compiled:
                continue
            source = ASTSource(fn=recorder.kernel, signature=signature, constexprs=meta)
            triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
            compiled.add(key)
    print(f"compiled {len(compiled)} kernel variants of fastkd.kernels.{name}")
    return 0


if __name__ == "__main__":
    sys.exit(compile_module(sys.argv[1]))
