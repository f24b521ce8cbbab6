"""Test helper: compile Triton kernels for sm_90 on a machine without a GPU and read their PTX.

Compilation needs Triton's real compiler, which the interpreter (TRITON_INTERPRET=1, set for CPU
test runs) replaces; so the checks run in a fresh process without it.
"""
import os
import subprocess
import sys
from pathlib import Path


def ptx_for_sm90(kernel, types: dict, constexprs: dict, num_warps: int, aligned=()) -> str:
    """PTX of ``kernel`` for sm_90.

    ``types`` names argument types (e.g. ``{"x_ptr": "*bf16", "seq": "i64"}``); other ``*_ptr``
    arguments are ``*i32`` and the rest ``i32``. ``aligned`` arguments get the divisible-by-16
    specialisation Triton's launcher gives 16-byte-aligned pointers and multiples of 16.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kernel.fn)
    signature = {name: "constexpr" if name in constexprs
                 else types.get(name, "*i32" if name.endswith("_ptr") else "i32")
                 for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def run_without_interpreter(test_file: str, func: str = "compile_all_for_sm90", timeout_s: int = 300) -> None:
    """Call ``func`` of the test module ``test_file`` in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import {Path(test_file).stem} as t; t.{func}()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(test_file).parent, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
