"""Stage 1 — train towards structure: config, data, the loop, evaluation + BatchNorm recalibration, checkpoints."""
