"""The config arguments every msg-* command shares: a config path or bundled name, and --set."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_msg.config import ConfigError, RunConfig, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo_tiny_gpt.yaml"


def resolve_config_path(name: str | None) -> Path:
    """A path, or the name of a bundled config (``demo_tiny_gpt``, ``paper/sch1_b``...)."""
    if name is None:
        return DEFAULT_CONFIG
    p = Path(name)
    if p.exists():
        return p
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    return bundled if bundled.exists() else p


def add_config_arguments(ap: argparse.ArgumentParser, optional: bool = True) -> None:
    """``config`` (optional: default the tiny GPT demo) and repeatable ``--set KEY=VALUE``."""
    if optional:
        ap.add_argument("config", nargs="?", help="YAML config path or bundled config name (default: the tiny GPT demo)")
    else:
        ap.add_argument("config", help="the run's YAML config (path or bundled config name)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set optimizer.lr=3e-4 (repeatable)")


def load_cli_config(prog: str, args: argparse.Namespace) -> RunConfig | None:
    """The validated config, or None after printing ``prog: config error: ...`` (exit code 2)."""
    try:
        return load_config(resolve_config_path(args.config), args.overrides)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return None
