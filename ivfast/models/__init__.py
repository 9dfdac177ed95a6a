"""Model components: encoder, teacher, predictor, heads, diffusion loss and the Stage-1 model."""
