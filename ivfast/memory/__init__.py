"""GPU memory: exact parameter counts, an analytic model per component, saved-tensor
measurement on the CPU, a per-phase peak tracker for training, and the ``ivfast-memory`` report."""
