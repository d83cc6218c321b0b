"""A toy world with known ground truth: procedural scenes, drag cases, a model trained on them,
and edit-quality measures (moved fraction, distance to target, area ratio, fidelity outside the mask)."""
