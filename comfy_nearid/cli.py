"""The ``nearid`` command line: one sub-command per module in :mod:`comfy_nearid.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs (``nearid --help`` stays fast and imports no torch).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Sequence

from . import __version__
from .errors import NearIDError
from .launch import end_process_group, exit_process
from .malloc import keep_freed_memory

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("comfy_nearid.commands.score", "score generated images against subject reference images"),
    "report": ("comfy_nearid.commands.report", "write the HTML report of an existing `nearid score` rows file"),
    "consistency": ("comfy_nearid.commands.consistency", "identity consistency within sets of images, without a reference"),
    "eval": ("comfy_nearid.commands.evaluate", "evaluate scorers: SSR/PA (NearID), MTG, DreamBench++ human alignment"),
    "synth": ("comfy_nearid.commands.synth", "generate the synthetic near-identity benchmark"),
    "demo": ("comfy_nearid.commands.demo", "run the whole method end to end on the synthetic benchmark"),
    "calibrate": ("comfy_nearid.commands.calibrate", "fit a head's 0-100 identity-match curve and report its calibration"),
    "convert": ("comfy_nearid.commands.convert", "convert the paper's released checkpoint to a NearID head file"),
    "backbones": ("comfy_nearid.commands.backbones", "list registered backbones and where their weights are looked for"),
}

@dataclass(frozen=True)
class ProcessSettings:
    """How ``nearid <command>`` sets up its process (the command owns it) before it runs.

    keep_freed_memory: glibc keeps large freed blocks for reuse (:mod:`comfy_nearid.malloc`),
        so each backbone pass reuses the last one's buffers instead of page-faulting fresh ones.
        Not for ``synth``: its numpy rendering ran slower with it (13.2-13.6 s against
        15.0-19.2 s for 200 identities, side by side); the demo turns it on after generating.
    passive_openmp: ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a policy (idle
        OpenMP threads sleep instead of spinning). Scoring decodes large images in threads
        beside torch's own, and spinning threads burn the cycles those need (measured with
        ``benchmarks/bench_scoring.py --only throughput``, both policies side by side). Not
        the backbone-bound commands: with sleeping threads each of MobileNetV2's ~60 small
        operations per pass waits for its threads to wake (67 to 98 img/s against 115 to 157
        with OpenMP's own default, spin briefly then sleep, side by side on 2 cores); and
        ``ACTIVE`` (spin forever) starves the demo's generator processes.
    """

    keep_freed_memory: bool = False
    passive_openmp: bool = False


#: The one table of per-command process settings; a command not named gets the defaults.
PROCESS_SETTINGS: dict[str, ProcessSettings] = {
    "score": ProcessSettings(keep_freed_memory=True, passive_openmp=True),
    "consistency": ProcessSettings(keep_freed_memory=True, passive_openmp=True),
    "eval": ProcessSettings(keep_freed_memory=True),
    "calibrate": ProcessSettings(keep_freed_memory=True),
}


def process_settings(command: str | None) -> ProcessSettings:
    """The :class:`ProcessSettings` of ``command`` (the defaults for any other)."""
    return PROCESS_SETTINGS.get(command or "", ProcessSettings())


def _load_command(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid",
        description="NearID identity scoring: score, evaluate, train and demo identity heads.",
    )
    parser.add_argument("--version", action="version", version=f"comfy-nearid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            _load_command(name).add_arguments(sp)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    return build_parser(command_of(argv)).parse_args(argv)


# Exit statuses: 2 = the input is wrong (a NearIDError: fix the file/option it names),
# 1 = something unexpected went wrong (a bug or the environment), 130 = interrupted.
EXIT_BAD_INPUT = 2
EXIT_UNEXPECTED = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # -v is for this package's own debug lines: PIL's decoder would log two lines per PNG read
    # (tens of thousands in a demo run), matplotlib one per font it looks at
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    if args.command is None:
        build_parser().print_help()
        return EXIT_BAD_INPUT
    if process_settings(args.command).keep_freed_memory:
        keep_freed_memory()
    try:
        return int(_load_command(args.command).run(args) or 0)
    except NearIDError as e:
        if args.verbose:
            logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"nearid {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"nearid {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        where = "" if args.verbose else "; run with -v for the traceback"
        print(f"nearid {args.command}: unexpected error: {type(e).__name__}: {_one_line(e)}{where}",
              file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        end_process_group()


def _one_line(e: BaseException) -> str:
    """The exception's message; multi-line messages (a list of searched places) are kept."""
    text = str(e).strip()
    return text or type(e).__name__


#: The wait policy of the commands with :attr:`ProcessSettings.passive_openmp`.
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


def default_openmp_policy(environ: "os._Environ[str] | dict[str, str]", torch_loaded: bool, command: str | None) -> None:
    """Set ``OMP_WAIT_POLICY`` to :data:`OMP_WAIT_POLICY_DEFAULT` for the commands whose
    :class:`ProcessSettings` ask for it, unless ``environ`` already names one (the user's
    choice wins) or torch is already loaded (its OpenMP runtime read the policy when it
    loaded; setting it later would only mislead)."""
    if not torch_loaded and process_settings(command).passive_openmp:
        environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names (its first known command word), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def entry_point() -> None:
    default_openmp_policy(os.environ, "torch" in sys.modules, command_of(sys.argv[1:]))
    exit_process(main())
