"""Models: networks, input preparation, inference (batched, AMP, sliding window), postprocessing."""
