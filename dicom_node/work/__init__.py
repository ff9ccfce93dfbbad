"""Work: the worker that runs a job, its segmentation steps and the warm-up."""
