"""Fused Triton kernels of the shared layers (the GPU path chosen by kvyard.kernels.use_triton).

Each module imports triton at its top, so it is imported only once a layer has decided to use
it. Every kernel loads in the storage dtype and computes in float32 (rounding intermediates to
the activation dtype where the torch path does, so both paths agree to the last bit or two).
"""
