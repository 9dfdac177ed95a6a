"""Fused ops: each file holds one op's PyTorch reference, Triton kernels, launchers, autograd
Function and functional API. ``dispatch`` decides per call whether a kernel or the reference
runs; nothing here imports the rest of ivfast."""
