"""Drag-loop kernels, dispatched by device (imported as `fastdrag.kernels`).

Today every name is the PyTorch reference of `reference.py`; GPU kernels plug in behind the same
names and contracts.
"""
from .reference import active_pairs, masked_l1, motion_supervision_loss, point_features, track_points

__all__ = ["active_pairs", "masked_l1", "motion_supervision_loss", "point_features", "track_points"]
