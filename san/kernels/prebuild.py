"""Build the attention kernels (``native.c``) for portable x86-64 levels, for machines without a C compiler: the
runtime images run this in their build stage, whose compiler the final stage does not have.

    python -m san.kernels.prebuild          # into the installed package, where san.kernels.native looks
    python -m san.kernels.prebuild DIR      # elsewhere (point $SAN_NATIVE_PREBUILT at it)
"""

import argparse
import os
import platform
import shutil
import subprocess
from pathlib import Path

from san.kernels import native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("directory", type=Path, nargs="?", default=native.PREBUILT_DIR, metavar="DIR",
                        help=f"where to write them (default: {native.PREBUILT_DIR})")  # fmt: skip
    args = parser.parse_args(argv)
    if not native.portable_machine():  # an arm64 image builds for its own CPU at run time, if it has a compiler
        print(f"nothing to build: the portable builds are x86-64 levels, this machine is {platform.machine()}")
        return
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    if compiler is None:
        parser.error(f"no C compiler ({name})")
    try:
        for path in native.prebuild(args.directory, compiler):
            print(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
