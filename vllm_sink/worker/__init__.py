"""Worker side: what runs in each worker process of a sink engine.

- :mod:`~vllm_sink.worker.extension`: the worker extension vLLM imports in each worker
  (``worker_extension_cls``); importing it installs the runner hooks
  (:mod:`vllm_sink.patches.model_runner`);
- :mod:`~vllm_sink.worker.streams`: each request's stream, compacted to ``[sinks | window]``.

The attention backends the worker runs are in :mod:`vllm_sink.attention`.
"""
