"""Triton kernels for the hot memory-bound work, each beside its PyTorch reference.

The model reaches every fusable operation through a reference function in ``ivfast.models``
(for example ``ivfast.models.token_ops``); kernels added here replace those references on
CUDA tensors behind config switches.
"""
