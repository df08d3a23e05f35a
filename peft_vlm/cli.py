"""The `peft-vlm` command line."""
from __future__ import annotations

import argparse
import sys

from peft_vlm.errors import PeftVlmError


def _info(arguments: argparse.Namespace) -> None:
    from peft_vlm.adapter_file import describe_adapter

    print(describe_adapter(arguments.adapter))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-vlm", description="Parameter-efficient fine-tuning of vision-language models")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="show what an adapter file holds")
    info.add_argument("adapter", help="adapter folder or .safetensors file")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        arguments.run(arguments)
    except PeftVlmError as error:
        print(f"peft-vlm {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
