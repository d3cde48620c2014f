"""Version-pinned patches of vLLM internals (imported as ``vllm_sink.patches``).

Convention (after vllm-ascend's ``patch/``): one module per patched component; each module's
docstring says what it replaces and why no public hook exists, calls
:func:`vllm_sink.compat.check_vllm_version` before patching, and has a test. Nothing here is
imported, let alone applied, unless the ``vllm_sink`` settings are given.
"""
