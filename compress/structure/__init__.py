"""Stage 0 — what can be removed: groups (DepGraph + zero-invariance), attention heads, and what each costs."""
