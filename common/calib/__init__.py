"""Calibration text and samplers, the layer-by-layer model runner, activation statistics."""
