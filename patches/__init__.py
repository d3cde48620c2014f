"""Version-pinned patches of vLLM internals (imported as ``vllm_sink.patches``).

Convention (after vllm-ascend's ``patch/``): one module per patched component; each module's
docstring says what it replaces and why no public hook exists, calls
:func:`vllm_sink.compat.check_vllm_version` before patching (the two always-on modules below
instead stay inert on an untested vLLM), and has a test (``tests/test_patches.py`` checks that
each replaced function is replaced exactly when it should be; the behaviour tests are named
below).

Everything the plugin changes in vLLM. No patch is ever undone: each wrapper passes straight
through for an engine whose config does not enable ``vllm_sink``, so a process may host sink and
vanilla engines side by side (``tests/test_envelope.py::
test_vanilla_engine_after_a_sink_engine_in_one_process``).

============================  ===================================================================
module (installed when)       replaces, why, and the vLLM change that would let it go
============================  ===================================================================
``cli_args`` (plugin load)    ``EngineArgs.add_cli_args`` / ``from_cli_args``: the
                              ``--sink-tokens`` / ``--window-tokens`` flags. Gone with a plugin
                              hook for CLI arguments. Test: ``test_serve.py``, ``test_plugin.py``.
``engine_args`` (plugin       ``EngineArgs.create_engine_config``: adjust the arguments and refuse
load)                         unsupported configs around the config build. Gone with a pre/post
                              config-build hook for general plugins. Test: ``test_unsupported.py``.
``input_processor`` (first    ``InputProcessor._validate_prompt_len`` / ``process_inputs``:
sink config)                  prompts past ``max_model_len``, default ``max_tokens``. Gone with a
                              per-engine prompt-length policy. Test: ``test_engine_sink.py``,
                              ``test_envelope.py::test_shared_sampling_params_keep_no_default``.
``output_processor`` (first   ``RequestState.from_new_request`` / ``make_request_output``: a
sink config)                  streamed (DELTA) request keeps only the tail of its token ids,
                              text and sample logprobs. Gone with a bounded-history option for
                              DELTA requests. Test: ``test_host_state.py``.
``renderer_params`` (first    ``TokenizeParams._token_len_check``, ``BaseRenderer.
sink config)                  default_cmpl_tok_params`` / ``default_chat_tok_params``: no length cut
                              of text prompts. Gone with the same policy. Test:
                              ``test_engine_sink.py::test_long_text_prompt_is_not_truncated``.
``openai_server`` (first      ``create_completion`` / ``create_chat_completion``, both
sink config)                  ``build_tok_params``, both ``get_max_tokens``: the OpenAI layer's
                              length checks. Gone with the same policy. Test: ``test_serve.py``.
``chat_serving`` (first sink   ``OpenAIServingChat.chat_completion_stream_generator``, recompiled
config)                       from vLLM's source with one statement changed: the chat stream
                              stops appending every delta to ``previous_texts`` (read only by
                              ``--enable-log-outputs``). Gone when vLLM accumulates it only for
                              that option. Test: ``test_host_state.py``.
``stat_loggers`` (first sink  ``async_llm.load_stat_logger_plugin_factories``: the ``vllm_sink:*``
config)                       metrics for sink engines only. Gone with per-engine stat-logger
                              plugins. Test: ``test_serve.py`` (metrics).
``model_runner`` (worker of   ``GPUModelRunner._update_states`` / ``_prepare_inputs`` /
a sink engine)                ``_get_prompt_logprobs_dict`` / ``_bookkeeping_sync`` /
                              ``load_model``, ``CPUModelRunner.load_model``: the hooks that
                              connect the worker's stream state (``vllm_sink.worker.streams``:
                              compacted requests, position offsets, the step's sink work) and
                              the sink backends (``vllm_sink.attention``, registered for the
                              platform's kernel while the model is built, the model's rotary
                              embedding swapped for a copy with float64 angles) to the V1
                              runner; seeded generators restored (not rewound by offset, which
                              the CPU generator cannot do) after a partial-prefill step. Gone
                              with a runner hook for per-request block tables and positions
                              (and a CPU fix for the rewind). Test: every engine test,
                              ``test_triton_path.py``,
                              ``test_envelope.py::test_seeded_request_with_a_chunked_prompt``,
                              ``test_engine_positions.py``.
``bench_commands`` (a bench  ``vllm.benchmarks.throughput.run_vllm`` / ``run_vllm_chat`` /
command builds its parser)    ``run_vllm_async``, ``vllm.benchmarks.latency.main``, recompiled
                              from vLLM's source with the one expression that reads
                              ``max_model_len`` in their length check routed through
                              ``length_limit`` (unbounded for a sink engine only): ``vllm bench
                              throughput/latency`` measure streams past ``max_model_len``. Gone
                              with a length check that asks the engine. Test:
                              ``test_bench_commands.py``.
============================  ===================================================================

Public extension points used, not patches: ``additional_config`` (settings),
``scheduler_cls`` (:mod:`vllm_sink.scheduler`), ``worker_extension_cls``
(:mod:`vllm_sink.worker.extension`), the KV-cache spec/manager registry (:mod:`vllm_sink.kv_cache`),
``register_backend`` (scoped by ``model_runner``), ``async_scheduling=False``, the
``vllm.endpoint_plugins`` entry point (``/vllm_sink/host_state``, :mod:`vllm_sink.endpoint`).
"""
