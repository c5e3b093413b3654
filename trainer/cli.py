"""Command line: ``python -m trainer --config CONFIG [overrides]`` (and under ``accelerate launch``).

Overrides are ``--section.key VALUE`` or ``section.key=VALUE`` for any config field (see
``trainer/configs/paper.yaml`` for the keys), plus ``--resume latest|PATH``. ``--print-config``
shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from comfy_nearid.errors import NearIDError
from comfy_nearid.launch import end_process_group, exit_process

CONFIGS_DIR = Path(__file__).with_name("configs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        allow_abbrev=False,  # every other --option is a config override
        description="Train a NearID identity head with the two-tier objective (Accelerate).",
        epilog=(
            "Any config field can be overridden: --section.key VALUE or section.key=VALUE "
            "(e.g. --train.epochs 3 optim.lr=3e-4 --resume latest). "
            f"Shipped configs: {', '.join(sorted(p.name for p in CONFIGS_DIR.glob('*.yaml')))} in {CONFIGS_DIR}."
        ),
    )
    parser.add_argument(
        "--config",
        help="YAML or JSON config (a path, or the name of a shipped config: paper, synth); "
        "omitted = the paper's recipe defaults",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def resolve_config_path(value: str | None) -> Path | None:
    """A path, or the bare name of a shipped config (``synth`` -> ``trainer/configs/synth.yaml``)."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists() and (CONFIGS_DIR / f"{value}.yaml").is_file():
        return CONFIGS_DIR / f"{value}.yaml"
    return path


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Known options and the list of config overrides (everything else)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return build_parser().parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .config import config_to_dict, load_config

    try:
        config = load_config(resolve_config_path(args.config), overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
            return 0
        from .loop import train

        result = train(config)
    except NearIDError as e:
        logging.getLogger("trainer").error("%s", e)
        return 2
    finally:
        end_process_group()
    if result.test is not None:
        print(f"test SSR {result.test['ssr']:.2f} PA {result.test['pa']:.2f}")
    print(f"head: {result.head_path} (step {result.global_step}, run dir {result.run_dir})")
    return 0


def entry_point() -> None:
    exit_process(main())
