"""Run the trending-hashtags service: ``python -m examples.trending --bootstrap HOST:PORT``.

    python -m examples.trending --bootstrap localhost:9092 --schemas schemas
    python -m examples.trending --bootstrap kafka:9092 --registry http://registry:8081
    curl 'http://127.0.0.1:6067/top?n=10'

Stop it with Ctrl-C or SIGTERM: Faust commits and leaves the group; the next start
rebuilds the counts from the changelog topics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import faust

from examples.records import reader
from examples.trending.app import create_app


def faust_setting(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``: VALUE as JSON when it is JSON (numbers, true, ...), else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Trending hashtags from tagstream's results.")
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic", default="hashtags", help="the results topic (full name)")
    parser.add_argument("--schemas", type=Path, help="folder of tagstream's .avsc files")
    parser.add_argument("--registry", help="schema registry URL, when tagstream uses one")
    parser.add_argument("--app-id", default="trending-hashtags", help="Faust app id and group")
    parser.add_argument("--window", type=float, default=900.0, help="window length, seconds")
    parser.add_argument("--step", type=float, default=60.0, help="a new window every, seconds")
    parser.add_argument("--top", type=int, default=10, help="hashtags answered by /top")
    parser.add_argument("--web-host", default="127.0.0.1")
    parser.add_argument("--web-port", type=int, default=6067)
    parser.add_argument("--session-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--faust",
        type=faust_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other faust.App setting, e.g. producer_linger=0.05 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.schemas is None and args.registry is None:
        parser.error("give --schemas, --registry or both")
    app = create_app(
        bootstrap=args.bootstrap,
        topic=args.topic,
        read=reader(schema_dir=args.schemas, registry_url=args.registry),
        app_id=args.app_id,
        window_s=args.window,
        step_s=args.step,
        top_n=args.top,
        web_host=args.web_host,
        web_port=args.web_port,
        session_timeout_s=args.session_timeout,
        **dict(args.faust),
    )
    faust.Worker(app, loglevel="info").execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
