"""Stage 1 with a promise — budgets: the target, zero patterns at a cost, the λ controller, the latency model."""
