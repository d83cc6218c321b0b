"""Deployment export (imported as `fastdrag.export`): LoRA merge, ONNX graphs, engines, backends.

Nothing is exported yet; the export issue fills this package.
"""
