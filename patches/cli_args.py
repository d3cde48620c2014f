"""Patch ``EngineArgs.add_cli_args`` and ``EngineArgs.from_cli_args``: the ``--sink-tokens`` and
``--window-tokens`` flags of ``vllm serve`` (and of every command that builds its parser from
``EngineArgs``, e.g. ``vllm bench throughput/latency``).

vLLM has no hook for a plugin to add CLI flags; the only extension point is the opaque
``--additional-config`` JSON. vLLM loads general plugins at the start of
``AsyncEngineArgs.add_cli_args`` (and in ``EngineArgs.__post_init__``), before it calls
``EngineArgs.add_cli_args``, so wrapping that static method adds an argument group "vllm-sink";
wrapping ``from_cli_args`` moves the two values from the parsed namespace into
``additional_config["vllm_sink"]``, so everything downstream (config hash, engine processes) sees
exactly what ``--additional-config '{"vllm_sink": {...}}'`` would give.

Unlike the other patches this one is applied by :func:`vllm_sink.plugin.register` whether or not
the feature is on, because the flags are how a server user turns it on. It only adds two options
that are absent unless given; without them nothing changes. On an unsupported vLLM version it logs a
warning and adds nothing, so a vanilla vLLM keeps working.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from vllm_sink.compat import UnsupportedVllmError, check_vllm_version
from vllm_sink.settings import CONFIG_KEY, SinkConfigError, parse_settings

GROUP = "vllm-sink"
# Setting name -> CLI flag.
FLAGS = {"sink_tokens": "--sink-tokens", "window_tokens": "--window-tokens"}
_HELP = {
    "sink_tokens": "Tokens pinned at the start of each stream (default 4); turns vllm-sink on.",
    "window_tokens": "Recent tokens kept besides the sinks; turns vllm-sink on (required then).",
}

_applied = False


def _name_flags(message: str) -> str:
    """Say ``--window-tokens`` where ``parse_settings`` says ``vllm_sink.window_tokens``."""
    for field, flag in FLAGS.items():
        message = message.replace(f"{CONFIG_KEY}.{field}", flag)
    return message


def _flag_type(field: str):
    """An argparse ``type`` that checks one flag's value alone, at parse time (fails fast)."""
    # A valid partner value, so only this flag's own constraints are checked here.
    partner = {"sink_tokens": {"window_tokens": 1}, "window_tokens": {}}[field]

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        try:
            parse_settings({**partner, field: number})
        except SinkConfigError as err:
            detail = str(err).split(f"{CONFIG_KEY}.{field}: ", 1)[-1]
            raise argparse.ArgumentTypeError(detail) from None
        return number

    parse.__name__ = field  # argparse names the type in some messages
    return parse


def add_sink_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "vllm-sink" argument group to ``parser`` (once)."""
    if FLAGS["window_tokens"] in parser._option_string_actions:
        return
    group = parser.add_argument_group(
        title=GROUP,
        description="StreamingLLM attention-sink eviction (vllm-sink plugin): "
        "--sink-tokens, --window-tokens.",
    )
    for field, flag in FLAGS.items():
        # SUPPRESS: absent from the namespace unless given (and no "(default: None)" in --help).
        group.add_argument(
            flag,
            dest=field,
            type=_flag_type(field),
            default=argparse.SUPPRESS,
            metavar="N",
            help=_HELP[field],
        )


def merge_flags(additional_config: dict[str, Any] | None, flags: dict[str, int]) -> dict[str, Any]:
    """``additional_config`` with the given flag values merged into its ``vllm_sink`` section.

    Raises :class:`SinkConfigError` naming the flag when a value conflicts with
    ``--additional-config``, when ``--window-tokens`` is missing, or when the merged settings are
    invalid.
    """
    config = dict(additional_config or {})
    section = config.get(CONFIG_KEY)
    if section is None:
        section = {}
    elif not isinstance(section, dict):
        raise SinkConfigError(
            f"--additional-config '{CONFIG_KEY}' must be a dict to combine with "
            f"{', '.join(FLAGS[f] for f in flags)}, got {type(section).__name__}"
        )
    section = dict(section)
    for field, value in flags.items():
        if field in section and section[field] != value:
            raise SinkConfigError(
                f"{FLAGS[field]}={value} conflicts with --additional-config "
                f"{CONFIG_KEY}.{field}={section[field]!r}; give it once"
            )
        section[field] = value
    if "window_tokens" not in section:
        raise SinkConfigError(
            f"{FLAGS['window_tokens']} is required when vllm-sink is on "
            f"({', '.join(FLAGS[f] for f in flags)} given)"
        )
    try:
        parse_settings(section)
    except SinkConfigError as err:
        raise SinkConfigError(_name_flags(str(err))) from None
    config[CONFIG_KEY] = section
    return config


def move_flags(args: argparse.Namespace) -> None:
    """Move the flags from ``args`` into ``args.additional_config`` (idempotent)."""
    flags = {}
    for field in FLAGS:
        value = getattr(args, field, None)
        if value is not None:
            flags[field] = value
        if hasattr(args, field):
            # Gone once moved, so a second from_cli_args on the same namespace (e.g. in a
            # spawned API-server process) sees only additional_config.
            delattr(args, field)
    if flags:
        args.additional_config = merge_flags(getattr(args, "additional_config", None), flags)


def apply() -> None:
    """Install both wrappers (idempotent); called by the plugin entry point in every process."""
    global _applied
    if _applied:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import init_logger

    try:
        check_vllm_version("vllm_sink.patches.cli_args")
    except UnsupportedVllmError as err:
        init_logger("vllm.vllm_sink").warning("%s; --sink-tokens/--window-tokens not added", err)
        _applied = True
        return

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.__dict__["from_cli_args"].__func__

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_sink_arguments(parser)
        # A bench command building its parser: let its length checks see sink engines.
        from vllm_sink.patches import bench_commands

        bench_commands.apply()
        return parser

    @functools.wraps(original_from)
    def from_cli_args(cls, args: argparse.Namespace):
        move_flags(args)
        return original_from(cls, args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    _applied = True
