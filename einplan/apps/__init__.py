"""Whole jobs built on the runtime: the training loop and its run folder, evaluation,
calibration, quantised checkpoints, the quantisation report and chat prompts."""
