"""Shared building blocks of the DecDEC setup scripts, one job per module:

io/        checkpoints read tensor by tensor, models and torch.save streams written, outputs that
           never destroy anything (checks, locks, free space, atomic renames)
quant/     the residual cheatsheet, AWQ (transforms, search), SqueezeLLM LUTs, the LUT-GEMM format
calib/     calibration text and samplers, the layer-by-layer model runner, activation statistics
simulate/  evaluate.py's checks and its simulation of DecDEC's runtime
errors, cli, layers: what every script shares; one_pass: decdec_setup.py's per-layer stages;
tiny_models: small seeded models and tokenizers for the demo and the tests
"""
