"""The config arguments every msg-* command shares: a config path or bundled name, and --set."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_msg.config import BUNDLED_CONFIGS, ConfigError, RunConfig, load_config
from megatron_msg.config import resolve_config_path as _resolve

CONFIG_DIR = BUNDLED_CONFIGS
DEFAULT_CONFIG = CONFIG_DIR / "demo_tiny_gpt.yaml"


def resolve_config_path(name: str | None) -> Path:
    """A path, or the name of a bundled config (``demo_tiny_gpt``, ``paper/bert_base_sch1``...)."""
    return DEFAULT_CONFIG if name is None else _resolve(name)


def add_config_arguments(ap: argparse.ArgumentParser, optional: bool = True) -> None:
    """``config`` (optional: default the tiny GPT demo) and repeatable ``--set KEY=VALUE``."""
    if optional:
        ap.add_argument("config", nargs="?", help="YAML config path or bundled config name (default: the tiny GPT demo)")
    else:
        ap.add_argument("config", help="the run's YAML config (path or bundled config name)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set optimizer.lr=3e-4 (repeatable)")


def load_cli_config(prog: str, args: argparse.Namespace, check_files: bool = True) -> RunConfig | None:
    """The validated config, or None after printing ``prog: config error: ...`` (exit code 2).

    ``check_files=False``: the data and tokenizer files need not exist yet (msg-plan)."""
    try:
        return load_config(resolve_config_path(args.config), args.overrides, check_files=check_files)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return None
