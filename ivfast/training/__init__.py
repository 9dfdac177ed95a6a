"""Training machinery: DeepSpeed engine set-up, optimiser, schedule, checkpoints, metrics."""
