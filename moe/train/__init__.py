"""Training: the loop, the optimizer step, evaluation, preemption, run folders and checkpoints."""
