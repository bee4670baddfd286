"""The fast layer sets: the same functions as ``minigpt2/layers.py``, made fast, tested equal.

``cpu_layers`` and ``cpu_attention``: NumPy in place and in cache-sized blocks (the tiled,
FlashAttention form for long sequences); ``gpu_layers``: CuPy with the fused CUDA kernels of
``kernels`` and the FlashAttention kernels of ``flash_kernels`` (their shared CUDA C in
``cuda_source``). A model picks its set once, when it is built.
"""
