"""Commands built on training: sweeps, dense matching, parity, inference."""
