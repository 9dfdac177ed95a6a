"""The op tests run the kernels through Triton's interpreter (tests/conftest.py switches it on
where there is no GPU). The interpreter converts float32 to bfloat16 by truncation where a GPU
(``cvt.rn.bf16.f32``) rounds to nearest even; every test here gets the GPU's rounding, so that
the kernels' low-precision results are held to what the hardware computes."""
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _interpreter_rounds_bf16_to_nearest(monkeypatch):
    from ivfast.ops.dispatch import interpreting

    if not interpreting():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)
