"""Quantizers and their formats: the residual cheatsheet, AWQ (transforms and search), SqueezeLLM LUTs, LUT-GEMM."""
