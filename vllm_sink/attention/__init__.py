"""Worker side: the sink attention backends.

- :mod:`~vllm_sink.attention.sink`: the sink wrapper (the step's captures, sink moves and window
  rebases, applied by each layer before the stock kernel runs), written once;
- :mod:`~vllm_sink.attention.rope`: the model's rotary embedding with exact angles and the
  rotator that moves keys with it;
- :mod:`~vllm_sink.attention.cpu`, :mod:`~vllm_sink.attention.triton`: what differs per kernel
  (metadata builder, KV layout, cache writer), side by side;
- :mod:`~vllm_sink.attention.kernels`: which kernel runs on which platform, and its registration;
- :mod:`~vllm_sink.attention.triton_on_cpu`: the Triton kernels interpreted on a CPU engine.
"""
