"""``python -m calibrate ...``: the same commands as ``disagg calibrate ...``."""

import logging

from calibrate.cli import app

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="python -m calibrate")
