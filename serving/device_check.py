"""The GPU image's start-time check: ``python -m serving.device_check [--require DEVICE] [-- COMMAND ...]``.

A provider ``onnxruntime.get_available_providers()`` lists can still fail to load, and a build
machine has no GPU, so whether the image really runs ONNX Runtime on CUDA is known only where it
runs. The GPU image's entrypoint runs this first: it tries ``DEVICE`` (default
``$MODELYARD_REQUIRE_DEVICE``, ``cuda`` in that image; empty: no check) by creating a session
(:meth:`serving.devices.Device.choose`, strict), exits 3 with the reason when a provider does
not load, and otherwise runs COMMAND in its place (``exec``: the check leaves no CUDA context
behind in the process that follows).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from serving.devices import Device
from shared.errors import UserInputError

REQUIRE_ENV = "MODELYARD_REQUIRE_DEVICE"


def main(argv: Sequence[str] | None = None) -> int:
    """Check a device at container start, then exec the command (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m serving.device_check", description="Try an execution device.")
    parser.add_argument("--require", default=os.environ.get(REQUIRE_ENV, ""),
                        help="cpu, cuda or tensorrt (default: $MODELYARD_REQUIRE_DEVICE; empty: no check)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run when it loads")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.require:
        try:
            device = Device.choose(args.require, strict=True)
        except UserInputError as exc:
            print(f"modelyard: {exc} (set MODELYARD_REQUIRE_DEVICE= to start without the check)", file=sys.stderr)
            return 3
        print(f"modelyard: {device.describe()}", file=sys.stderr)
    if command:
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
