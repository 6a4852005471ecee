"""``python -m workers``: run one worker against the configured broker and database."""

from __future__ import annotations

import argparse
import os

from service.app import create_app
from service.logging_setup import configure as configure_logging
from workers.celery_worker import run_worker


def main() -> None:
    parser = argparse.ArgumentParser(prog="kiln worker")
    parser.add_argument("--name", help="worker name (default: host name)")
    parser.add_argument("--backends", default="", help="comma list, default: all available")
    parser.add_argument("--gpu", type=int, help="pin this worker to one GPU (one worker per GPU)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    if args.gpu is not None:
        # Set before anything can touch CUDA: the probe and build children inherit it.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    app = create_app()
    configure_logging(app.extensions["kiln"].settings.log_format, args.loglevel)
    name = args.name or (f"gpu{args.gpu}" if args.gpu is not None else None)
    run_worker(app, name=name, backends=args.backends, loglevel=args.loglevel)


if __name__ == "__main__":
    main()
