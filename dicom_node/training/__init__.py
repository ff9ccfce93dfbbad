"""Training: one loop for 2D and 3D models, their data, evaluation and model cards."""
