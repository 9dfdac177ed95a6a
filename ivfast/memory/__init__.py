"""GPU memory of a training step: exact parameter counts, an analytic model per component,
saved-tensor measurement on the CPU and the ``ivfast-memory`` report."""
