"""Importing megatron-core with its torch.compile calls deferred (core/cpu/lazy_compile.py): the
import leaves torch's compiler unloaded and torch.compile as it was, and a fused kernel compiles
at its first call and computes what its eager code does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from retro_toolkit.core.cpu.lazy_compile import deferred
from tests.conftest import REPO


def test_a_deferred_function_is_compiled_once_at_its_first_call_with_the_decorators_arguments():
    calls = []

    def compile_fn(fn, **kwargs):
        calls.append((fn.__name__, kwargs))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    compile = deferred(compile_fn)

    @compile
    def double(x):
        """Twice x."""
        return 2 * x

    @compile(mode="max-autotune", dynamic=False)
    def half(x):
        return x / 2

    assert calls == [] and double.__name__ == "double" and double.__doc__ == "Twice x."
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert half(3) == ("compiled", 1.5)
    assert calls == [("double", {}), ("half", {"mode": "max-autotune", "dynamic": False})]


def test_megatron_core_imports_without_torchs_compiler_and_its_kernels_compile_when_called():
    code = textwrap.dedent("""
        import sys
        from retro_toolkit.core.cpu import before_megatron
        before_megatron()
        import torch
        real = torch.compile
        import megatron.core
        from megatron.core.fusions.fused_bias_gelu import bias_gelu
        assert "torch._dynamo" not in sys.modules and "torch._inductor" not in sys.modules, "compiler imported"
        assert torch.compile is real, "torch.compile not restored"
        b, y = torch.randn(8, generator=torch.Generator().manual_seed(0)), torch.ones(8)
        out = bias_gelu(b, y)
        assert "torch._dynamo" in sys.modules, "not compiled at the first call"
        x = b + y
        assert torch.allclose(out, x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))))
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr
