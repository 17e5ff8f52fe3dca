"""The `tagstream` command line: one entry point for every process of the pipeline.

The composition root (docs/architecture.md): the only package that imports from every
layer. Each command imports what it runs inside its own function, for start-up time:
`tagstream --help` stays fast, and a serving process (`tagstream infer`, `sink`,
`produce`) never loads what it does not use, torch above all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.kafka import wait_for_broker
from infra.settings import get_settings
from models import args as model_args


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_up(args: argparse.Namespace) -> int:
    from tagstream.up import up

    return up(get_settings(), rate=args.rate, count=args.count)


def cmd_broker(args: argparse.Namespace) -> int:
    from infra.broker import EmbeddedBroker
    from infra.topics import ensure_topics

    settings = get_settings()
    stop = _stop_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        ensure_topics(settings.model_copy(update={"kafka_bootstrap": broker.bootstrap}))
        print(f"export TAGSTREAM_KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
        while not stop.wait(1.0):
            if not broker.alive():
                print("broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from infra.topics import ensure_topics

    settings = get_settings()
    wait_for_broker(settings)
    created = ensure_topics(settings)
    print("created: " + (", ".join(created) or "none (all exist)"))
    return 0


def cmd_serve_images(args: argparse.Namespace) -> int:
    from infra.image_server import run_image_server

    settings = get_settings()
    run_image_server(
        args.host or settings.image_server_host, args.port or settings.image_server_port
    )
    return 0


@contextlib.contextmanager
def _serving_metrics(settings, *, health=None) -> Iterator[Any]:
    """``/metrics`` and ``/healthz`` on the metrics port for as long as the block runs."""
    from infra.metrics import serve_metrics

    server = serve_metrics(settings, health=health)
    try:
        yield server
    finally:
        server.stop()


def _hand_over_figures(settings, server) -> None:
    """A source that ended on its own: let one more scrape take its last figures."""
    if settings.metrics_final_scrape_s > 0:
        server.wait_for_scrape(settings.metrics_final_scrape_s)


def _produce(settings, main) -> Any:
    """A source command: once Kafka answers, coroutine function `main(stop)` with
    SIGINT/SIGTERM setting `stop` and the metrics served; a run that ends on its own hands
    its figures over."""
    wait_for_broker(settings)
    stopped = False

    async def watched(stop: asyncio.Event) -> Any:
        nonlocal stopped
        try:
            return await main(stop)
        finally:
            stopped = stop.is_set()

    with _serving_metrics(settings) as server:
        result = _run_with_signals(watched)
        if not stopped:
            _hand_over_figures(settings, server)
    return result


def _run_with_signals(main) -> Any:
    """Run coroutine function `main(stop)` with SIGINT/SIGTERM setting `stop`."""

    async def run() -> Any:
        # An asyncio.Event, set from the loop's own signal handlers, stops a source at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await main(stop)

    return asyncio.run(run())


def cmd_produce_synthetic(args: argparse.Namespace) -> int:
    from producers.source import PositionFile, run_source
    from producers.synthetic import SyntheticSource, SyntheticTweets

    settings = get_settings()
    base = (
        args.image_base_url or f"http://{settings.image_server_host}:{settings.image_server_port}"
    )
    # --photos-only: one good photo per tweet, for benchmarks that count images.
    only = dict.fromkeys(
        ("fault_fraction", "no_media_fraction", "video_fraction", "multi_photo_fraction"), 0.0
    )
    generator = SyntheticTweets(
        image_base_url=base, seed=args.seed, **(only if args.photos_only else {})
    )
    source = SyntheticSource(
        generator,
        rate=args.rate,
        count=args.count,
        start=args.start,
    )
    positions = PositionFile(Path(args.state)) if args.state else None
    counts = _produce(
        settings, lambda stop: run_source(settings, source, stop=stop, positions=positions)
    )
    print(f"produced {counts['tweets']} synthetic tweets", flush=True)
    return 0


def _no_bearer_token(settings, endpoint: str) -> bool:
    """True (after saying so) when the X API bearer token is not configured."""
    from infra.exceptions import ConfigurationError
    from producers.xapi import require_token

    try:
        require_token(settings)
    except ConfigurationError:
        print(
            f"error: TAGSTREAM_X_BEARER_TOKEN is not set; the X API {endpoint} needs an "
            "app bearer token",
            file=sys.stderr,
        )
        return True
    return False


def cmd_produce_twitter(args: argparse.Namespace) -> int:
    from producers.source import summary as source_summary
    from producers.xapi import run_twitter_producer

    settings = get_settings()
    if _no_bearer_token(settings, "filtered stream"):
        return 2

    async def run(stop: asyncio.Event) -> Counter[str]:
        archive = None
        if args.archive is not None and not args.dry_run:
            from producers.archive import StreamArchive

            archive = StreamArchive(args.archive)
        try:
            return await run_twitter_producer(
                settings,
                rules=args.rules,
                dry_run=args.dry_run,
                stop=stop,
                max_tweets=args.max_tweets,
                archive=archive,
            )
        finally:
            if archive is not None:
                archive.close()

    # A dry run only checks the rules: nothing to scrape.
    counts = _run_with_signals(run) if args.dry_run else _produce(settings, run)
    summary = source_summary(counts)
    print(f"twitter{' (dry run)' if args.dry_run else ''}: {summary}", flush=True)
    return 0


def _classes(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t.strip()] if text is not None else None


def _produce_from(settings, source, args, *, positions=None) -> Counter[str]:
    """Pump `source` until a signal (or --max-tweets), archiving with --archive."""
    from producers.source import run_source

    async def run(stop: asyncio.Event) -> Counter[str]:
        archive = None
        if args.archive is not None:
            from producers.archive import StreamArchive

            archive = StreamArchive(args.archive)
        try:
            return await run_source(
                settings,
                source,
                stop=stop,
                max_tweets=args.max_tweets,
                archive=archive,
                positions=positions,
            )
        finally:
            if archive is not None:
                archive.close()

    return _produce(settings, run)


def cmd_produce_bluesky(args: argparse.Namespace) -> int:
    from infra.tail import parse_time
    from producers.bluesky import BlueskySource, Jetstream, since_cursor
    from producers.posts import TagFilter, default_classes
    from producers.source import PositionFile
    from producers.source import summary as source_summary

    settings = get_settings()
    cursor = None
    if args.cursor is not None:
        cursor = [args.cursor, 0]
    elif args.since is not None:
        cursor = [since_cursor(parse_time(args.since)), 0]
    tags = TagFilter(None if args.all else _classes(args.tags) or default_classes())
    stream = Jetstream(url=settings.bluesky_jetstream_url, cursor=cursor)
    source = BlueskySource(stream, tags=tags, cdn_url=settings.bluesky_cdn_url)
    state = Path(args.state) if args.state else settings.data_dir / "bluesky-cursor.json"
    counts = _produce_from(settings, source, args, positions=PositionFile(state))
    counts.update(stream.counters)
    summary = source_summary(counts)
    print(f"bluesky: {summary}; position saved in {state}", flush=True)
    return 0


def cmd_produce_mastodon(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from producers.mastodon import MastodonSource, MastodonStreams, streams_for
    from producers.posts import TagFilter
    from producers.source import summary as source_summary

    settings = get_settings()
    tags = TagFilter(_classes(",".join(args.tag)) if args.tag else None)
    token = SecretStr(args.token) if args.token else settings.mastodon_token
    streams = MastodonStreams(
        instance=args.instance, streams=streams_for(tags, local=args.local), token=token
    )
    source = MastodonSource(streams, tags=tags)
    counts = _produce_from(settings, source, args)
    counts.update(streams.counters)
    summary = source_summary(counts)
    print(f"mastodon {streams.host}: {summary}", flush=True)
    return 0


def _add_replay_window(
    parser: argparse.ArgumentParser, *, topic_help: str, speed: str, speed_help: str
) -> None:
    """The options `replay` and `evaluate` share: what to replay, and how fast."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", default=None, help="an archive file or folder (or JSON lines)")
    source.add_argument("--topic", default=None, help=topic_help)
    parser.add_argument(
        "--from",
        dest="start",
        default=None,
        help="first offset (line index, or offset in each partition) or ISO time, inclusive",
    )
    parser.add_argument(
        "--to", dest="stop", default=None, help="last offset or ISO time, exclusive"
    )
    parser.add_argument("--speed", default=speed, help=speed_help)


def _replay_window(args: argparse.Namespace) -> dict:
    """What to replay, from the options `_add_replay_window` gives `replay` and `evaluate`."""
    from producers.replay import parse_bound

    return {
        "archive": Path(args.archive) if args.archive is not None else None,
        "topic": args.topic,
        "start": parse_bound(args.start) if args.start is not None else None,
        "stop": parse_bound(args.stop) if args.stop is not None else None,
        "speed": args.speed,
    }


def cmd_produce_replay(args: argparse.Namespace) -> int:
    from producers.replay import ReplaySource
    from producers.source import run_source
    from producers.source import summary as source_summary

    settings = get_settings()
    try:
        source = ReplaySource(settings, **_replay_window(args), run_id=args.run_id)
        counts = _produce(settings, lambda stop: run_source(settings, source, stop=stop))
    except OSError as e:  # an archive that cannot be read (our own errors: see main)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"replay {source.run_id}: {source_summary(counts)}", flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tagstream.evaluate import plan_evaluation, run_evaluation

    settings = get_settings()
    plan = plan_evaluation(
        settings,
        **_replay_window(args),
        labels=Path(args.labels) if args.labels is not None else None,
        model_dirs=[Path(d) for d in args.model_dir],
        out=Path(args.out),
        admission=args.admission,
        wait_s=args.wait,
        demo_images=args.demo_images,
        progress=not args.no_progress,
    )
    try:
        _, paths = run_evaluation(plan)
    except KeyboardInterrupt:
        print("interrupted: no report written", file=sys.stderr)
        return 130
    print(f"report: {paths['md']}, {paths['html']}, {paths['json']}", flush=True)
    return 0


def cmd_demo_archive(args: argparse.Namespace) -> int:
    from models.evaluation import write_labels
    from producers.synthetic import SyntheticTweets, write_archive

    settings = get_settings()
    base = (
        args.image_base_url or f"http://{settings.image_server_host}:{settings.image_server_port}"
    )
    generator = SyntheticTweets(
        image_base_url=base,
        seed=args.seed,
        fault_fraction=0.1 if args.faults else 0.0,
    )
    out = Path(args.out)
    truth = write_archive(generator, out / "archive", count=args.count, rate=args.rate)
    # "others" is the demo model's class for photos that deserve no hashtag.
    labels = write_labels(
        out / "labels.jsonl", {k: [] if c == "others" else [c] for k, c in truth.items()}
    )
    print(
        f"{args.count} demo tweets in {out / 'archive'}, {len(truth)} photo labels in {labels}; "
        f"evaluate with: tagstream evaluate --archive {out / 'archive'} --labels {labels} "
        "--demo-images --out REPORT_DIR",
        flush=True,
    )
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from producers.collect import collect, parse_tags

    settings = get_settings()
    if _no_bearer_token(settings, "recent search"):
        return 2
    try:
        manifest = asyncio.run(
            collect(
                settings,
                parse_tags(args.tags),
                args.per_class,
                args.out,
                max_results=args.max_results,
                max_pages=args.max_pages,
                near_threshold=args.near_threshold,
            )
        )
    except KeyboardInterrupt:
        print(f"interrupted; run it again to resume (progress: {args.out}/collect.json)")
        return 130
    for tag, r in manifest["tags"].items():
        print(
            f"{tag}: {r['saved']}/{args.per_class} images ({r['saved_new']} new), "
            f"{r['pages']} pages; skipped {r['duplicates_url']} seen urls, "
            f"{r['duplicates_exact']} exact and {r['duplicates_near']} near duplicates, "
            f"{r['not_photo']} not photos, {r['fetch_failed']} fetch failures, "
            f"{r['rejected']} undecodable",
            flush=True,
        )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from models.runtime import OnnxClassifier
    from processors.inference import InferenceConsumer

    settings = get_settings()
    model_dir = args.model_dir or settings.model_dir
    if model_dir is None:
        # Imported only when needed, for start-up time: training the demo model loads torch,
        # which serving a given model never does.
        from models.demo import ensure_demo_model

        model_dir = ensure_demo_model(settings.data_dir)
    # The model first: a model or provider that cannot work is an error at once, not
    # after waiting for the broker.
    classifier = OnnxClassifier.from_settings(model_dir, settings)
    wait_for_broker(settings)
    stop = _stop_on_signals()
    consumer = InferenceConsumer(settings, classifier, group_id=args.group)
    with _serving_metrics(settings, health=consumer.healthy):
        stats = consumer.run(stop=stop)
    print(
        f"inference: {stats.images} images in {stats.batches} batches "
        f"(mean {stats.mean_batch:.1f}), {stats.images_per_s:.1f} images/s, "
        f"{stats.dead_letters} dead letters; {stats.provider} {stats.precision}, "
        f"decode on {stats.decode_device}",
        flush=True,
    )
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from processors.sink_consumer import run_sink

    settings = get_settings()
    wait_for_broker(settings)
    # SIGTERM (docker stop, systemd) as Ctrl-C: the sink writes its last window and its
    # producer flushes before the process ends.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(run_sink(settings))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    import os

    from infra.tail import parse_time, tail

    if args.since is not None:
        start: Any = parse_time(args.since)
    elif args.start is not None:
        start = args.start
    else:
        start = "beginning" if args.from_beginning else "end"
    stop = _stop_on_signals()
    try:
        tail(
            get_settings(),
            args.topic,
            start=start,
            limit=args.limit,
            as_json=args.json,
            out=sys.stdout,
            stop=stop,
        )
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's own
        # flush at exit from failing on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def offset(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"an offset is 0 or more, not {value}")
    return value


def cmd_demo_model(args: argparse.Namespace) -> int:
    from models.demo import ensure_demo_model
    from models.manifest import Manifest

    folder = ensure_demo_model(get_settings().data_dir)
    manifest = Manifest.load(folder)
    print(f"{folder}\n{manifest.name}: {manifest.metrics}")
    return 0


def cmd_device_bench(args: argparse.Namespace) -> int:
    from tagstream.device_bench import run_device_bench

    return run_device_bench(
        get_settings(), out=Path(args.out), cpu_dry_run=args.cpu_dry_run, budget_s=args.budget_s
    )


def cmd_bench(args: argparse.Namespace) -> int:
    if args.overload:
        from tagstream.overload_bench import overload_bench

        return overload_bench(get_settings(), seconds=args.seconds, throttle=args.throttle)
    if args.models:
        from models.variant_bench import model_table, print_model_table

        print_model_table(
            model_table(
                input_size=args.input_size,
                fraction=args.prune_fraction,
                accuracy=not args.speed_only,
                epochs=args.accuracy_epochs,
                finetune_epochs=args.finetune_epochs,
            )
        )
        return 0
    from tagstream.pipeline_bench import run_bench

    return run_bench(get_settings(), images=args.images, backlog=args.backlog)


#: The model commands: name, the module whose ``main(args)`` runs it, and the builder of its
#: own parser in models/args.py (torch-free, so that --help stays fast), as in torchvision's
#: references.
MODEL_COMMANDS = (
    ("train", "models.train", model_args.train_parser),
    ("pseudo-label", "models.pseudo_label", model_args.pseudo_label_parser),
    ("export", "models.export", model_args.export_parser),
    ("prune", "models.prune", model_args.prune_parser),
)


def cmd_model(args: argparse.Namespace) -> int:
    """Run a model command's ``main``; imported only now, so torch stays out of --help."""
    import importlib

    importlib.import_module(args.model_module).main(args)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tagstream", description="Real-time hashtag suggestions for tweet images."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (default: info)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole pipeline on this machine")
    up.add_argument("--rate", type=float, default=20.0, help="synthetic tweets/s (default: 20)")
    up.add_argument(
        "--count", type=int, default=0, help="tweets to produce, 0 = forever (default: 0)"
    )
    up.set_defaults(func=cmd_up)

    broker = commands.add_parser("broker", help="run the embedded broker and create the topics")
    broker.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    broker.set_defaults(func=cmd_broker)

    commands.add_parser("topics", help="create the topics that do not exist").set_defaults(
        func=cmd_topics
    )

    images = commands.add_parser("serve-images", help="run the demo image server")
    images.add_argument("--host", default=None, help="default: settings.image_server_host")
    images.add_argument(
        "--port", type=int, default=None, help="default: settings.image_server_port"
    )
    images.set_defaults(func=cmd_serve_images)

    produce = commands.add_parser("produce", help="produce tweets to the `tweets` topic")
    sources = produce.add_subparsers(dest="source", required=True)
    synthetic = sources.add_parser(
        "synthetic", help="demo traffic pointing at the demo image server"
    )
    synthetic.add_argument("--rate", type=float, default=20.0, help="tweets/s (default: 20)")
    synthetic.add_argument(
        "--count", type=int, default=100, help="tweets, 0 = forever (default: 100)"
    )
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    synthetic.add_argument(
        "--start", type=int, default=0, help="first line number of the generator (default: 0)"
    )
    synthetic.add_argument(
        "--photos-only",
        action="store_true",
        help="every tweet with exactly one good photo, no faults (benchmarks; default: the "
        "demo's mix of photos, videos, tweets without media and failing photos)",
    )
    synthetic.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="resume position file: a restart goes on after the last line delivered "
        "(default: none, start at --start)",
    )
    synthetic.add_argument(
        "--image-base-url", default=None, help="default: the configured image server"
    )
    synthetic.set_defaults(func=cmd_produce_synthetic)
    twitter = sources.add_parser(
        "twitter", help="the X API v2 filtered stream (needs TAGSTREAM_X_BEARER_TOKEN)"
    )
    twitter.add_argument(
        "--rules",
        default="targeted",
        help="'targeted' (one rule per class), 'general', or a JSON file of "
        "[{value, tag}] (default: targeted)",
    )
    twitter.add_argument(
        "--dry-run", action="store_true", help="only validate the rules with the API, then exit"
    )
    twitter.add_argument(
        "--max-tweets", type=int, default=None, help="stop after this many tweets (default: none)"
    )
    twitter.add_argument(
        "--archive",
        default=None,
        metavar="DIR",
        help="also archive every raw stream line, timed, to rotating gzip files in DIR",
    )
    twitter.set_defaults(func=cmd_produce_twitter)
    bluesky = sources.add_parser(
        "bluesky", help="Bluesky posts with images, from Jetstream (free, no account)"
    )
    which = bluesky.add_mutually_exclusive_group()
    which.add_argument(
        "--tags",
        default=None,
        help="comma-separated classes, matched by hashtag or word, e.g. cats,dogs "
        "(default: the demo model's classes)",
    )
    which.add_argument("--all", action="store_true", help="every post with images")
    start = bluesky.add_mutually_exclusive_group()
    start.add_argument(
        "--cursor",
        type=int,
        default=None,
        metavar="US",
        help="start at this Jetstream time (epoch microseconds) instead of the saved position",
    )
    start.add_argument(
        "--since",
        default=None,
        metavar="ISO",
        help="start at this time (ISO 8601, UTC when naive) instead of the saved position",
    )
    bluesky.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="resume position file (default: <data_dir>/bluesky-cursor.json)",
    )
    mastodon = sources.add_parser(
        "mastodon", help="Mastodon posts with images, from an instance's streaming API"
    )
    mastodon.add_argument(
        "--instance", required=True, help="the instance, e.g. https://mastodon.social"
    )
    mastodon.add_argument(
        "--tag",
        action="append",
        default=[],
        help="a class to read the hashtag streams of (cats reads #cat and #cats); "
        "repeat it or give a comma-separated list (default: the public timeline)",
    )
    mastodon.add_argument(
        "--local",
        action="store_true",
        help="without --tag: the instance's local timeline instead of the federated one",
    )
    mastodon.add_argument(
        "--token",
        default=None,
        help="access token, only for instances that need one for public streams "
        "(default: TAGSTREAM_MASTODON_TOKEN)",
    )
    for network in (bluesky, mastodon):
        network.add_argument(
            "--max-tweets",
            type=int,
            default=None,
            help="stop after this many posts (default: none)",
        )
        network.add_argument(
            "--archive",
            default=None,
            metavar="DIR",
            help="also archive what was taken in, raw and timed, to rotating gzip files in "
            "DIR (`produce replay --archive DIR` replays it)",
        )
    bluesky.set_defaults(func=cmd_produce_bluesky)
    mastodon.set_defaults(func=cmd_produce_mastodon)
    replay = sources.add_parser(
        "replay", help="re-produce an archive or a topic of tweets, keeping their timing"
    )
    _add_replay_window(
        replay,
        topic_help="a topic of Tweet records",
        speed="1x",
        speed_help="'1x', '10x', ... or 'max' (no waiting; default: 1x)",
    )
    replay.add_argument("--run-id", default=None, help="replay_run_id (default: a new uuid)")
    replay.set_defaults(func=cmd_produce_replay)

    evaluate = commands.add_parser(
        "evaluate",
        help="replay an archive or a topic range through the pipeline once per model and "
        "write one report (accuracy, calibration, latency, accounting) with the models "
        "side by side",
        description="Replay an archive or a topic range through the real pipeline (Faust "
        "worker and an inference consumer, on fresh topics of the embedded broker or of "
        "TAGSTREAM_KAFKA_BOOTSTRAP's cluster), once per --model-dir, under its own run id; "
        "collect every outcome of the run and write report.md, report.html, report.json "
        "and PNG plots into --out. The first model is the baseline of the others' deltas.",
    )
    _add_replay_window(
        evaluate,
        topic_help="a topic of Tweet records on TAGSTREAM_KAFKA_BOOTSTRAP",
        speed="max",
        speed_help="'1x', '10x', ... or 'max' (no waiting; the default: the same accuracy "
        "table every time)",
    )
    evaluate.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="the truth: JSON lines {media_key|tweet_id, hashtags} or a CSV with those "
        "columns (default: the class tags of the rules each tweet matched)",
    )
    evaluate.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a model folder with manifest.json; repeat it to compare models, the first "
        "being the baseline (default: settings.model_dir or the demo model)",
    )
    evaluate.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
    evaluate.add_argument(
        "--admission",
        choices=("none", "configured"),
        default="none",
        help="none: shed nothing for load, classify every photo (the default); configured: "
        "admit as the settings say and report the coverage",
    )
    evaluate.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="after a replay, give up on the outcomes still missing after S seconds without "
        "a new one (default: 60)",
    )
    evaluate.add_argument(
        "--demo-images",
        action="store_true",
        help="serve the demo images (settings.image_server_host:port) during the runs, for "
        "archives written by `tagstream demo-archive`",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_evaluate)

    demo_archive = commands.add_parser(
        "demo-archive",
        help="write a fixed demo stream as an archive, with a labels file, to evaluate on",
    )
    demo_archive.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/archive/ and DIR/labels.jsonl"
    )
    demo_archive.add_argument("--count", type=count, default=600, help="tweets (default: 600)")
    demo_archive.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    demo_archive.add_argument(
        "--rate", type=float, default=20.0, help="tweets/s of the archived timing (default: 20)"
    )
    demo_archive.add_argument(
        "--faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="photos that fail on purpose (404, slow, HTML, huge, corrupt; default: on)",
    )
    demo_archive.add_argument(
        "--image-base-url",
        default=None,
        help="where the photos are served (default: the configured demo image server)",
    )
    demo_archive.set_defaults(func=cmd_demo_archive)

    collect = commands.add_parser(
        "collect",
        help="download photos per tag from X API recent search into DIR/<tag>/ "
        "(needs TAGSTREAM_X_BEARER_TOKEN)",
    )
    collect.add_argument("--tags", required=True, help="comma-separated tags, e.g. cats,dogs")
    collect.add_argument(
        "--per-class", type=int, required=True, help="images wanted per tag (never more)"
    )
    collect.add_argument("--out", required=True, metavar="DIR", help="one folder per tag in DIR")
    collect.add_argument(
        "--near-threshold",
        type=int,
        default=6,
        help="perceptual-hash bits (of 64) within which a photo is a near duplicate; "
        "-1 turns that off (default: 6)",
    )
    collect.add_argument(
        "--max-pages", type=int, default=50, help="result pages read per query (default: 50)"
    )
    collect.add_argument(
        "--max-results", type=int, default=100, help="tweets per page, 10..100 (default: 100)"
    )
    collect.set_defaults(func=cmd_collect)

    infer = commands.add_parser("infer", help="run an inference consumer")
    infer.add_argument(
        "--model-dir", default=None, help="default: settings.model_dir or the demo model"
    )
    infer.add_argument(
        "--group",
        default=None,
        help="consumer group (default: <topic prefix>tagstream-inference); a new group "
        "reads the images topic from its beginning",
    )
    infer.set_defaults(func=cmd_infer)

    commands.add_parser("sink", help="run the sampled sink and its gallery").set_defaults(
        func=cmd_sink
    )
    tail = commands.add_parser(
        "tail",
        help="print a topic's records decoded, one line each (bytes shown as sizes)",
        description="Print the records of one of our topics, decoded, one line per record: "
        "from the end (new records only) unless told otherwise, following until --limit "
        "or Ctrl-C. Reads without a consumer group and commits nothing.",
    )
    tail.add_argument(
        "topic",
        metavar="TOPIC",
        help="tweets, images, hashtags, tweets.shed, deadletter or capacity (the prefix of "
        "TAGSTREAM_TOPIC_PREFIX is added)",
    )
    where = tail.add_mutually_exclusive_group()
    where.add_argument(
        "--from-beginning", action="store_true", help="start at each partition's beginning"
    )
    where.add_argument(
        "--from",
        dest="start",
        type=offset,
        default=None,
        metavar="OFFSET",
        help="start at this offset in every partition",
    )
    where.add_argument(
        "--since",
        default=None,
        metavar="ISO",
        help="records whose timestamp is at or after this ISO 8601 time (UTC if no zone)",
    )
    tail.add_argument(
        "--limit",
        type=count,
        default=None,
        metavar="N",
        help="stop after N records (default: follow)",
    )
    tail.add_argument(
        "--json", action="store_true", help="one JSON object per line, with where and when"
    )
    tail.set_defaults(func=cmd_tail)

    commands.add_parser("demo-model", help="train (once) and show the demo model").set_defaults(
        func=cmd_demo_model
    )
    for name, module, build in MODEL_COMMANDS:
        own = build(add_help=False)
        commands.add_parser(
            name, parents=[own], help=own.description, description=own.description
        ).set_defaults(func=cmd_model, model_module=module)

    bench = commands.add_parser("bench", help="throughput ratios measured in one run")
    bench.add_argument("--images", type=int, default=512, help="images per figure (default: 512)")
    bench.add_argument(
        "--backlog",
        type=int,
        default=200,
        help="photos of the smaller backlog the consumer's peak RSS is measured under; the "
        "larger is ten times that (default: 200)",
    )
    bench.add_argument(
        "--models",
        action="store_true",
        help="dense/pruned x FP32/INT8 throughput and digits accuracy table instead of the "
        "pipeline figures",
    )
    bench.add_argument(
        "--overload",
        action="store_true",
        help="offer 0.5x to 10x the pipeline's capacity, fixed-rate admission against the "
        "closed loop, and print latency, goodput and memory per run",
    )
    bench.add_argument(
        "--seconds", type=float, default=15.0, help="for --overload: seconds each run offers "
        "(default: 15)"
    )  # fmt: skip
    bench.add_argument(
        "--throttle",
        type=float,
        default=40.0,
        help="for --overload: the inference consumer's cap, images/s, standing for a device "
        "of its own so that the rest does not take its CPU; 0: none (default: 40)",
    )
    bench.add_argument("--input-size", type=int, default=224, help="for --models (default: 224)")
    bench.add_argument(
        "--prune-fraction",
        type=float,
        default=0.5,
        help="share of prunable channels removed, for --models (default: 0.5)",
    )
    bench.add_argument(
        "--speed-only",
        action="store_true",
        help="for --models: random weights, no digits accuracy task (default: off)",
    )
    bench.add_argument(
        "--accuracy-epochs",
        type=int,
        default=8,
        help="for --models: training epochs of the digits task (default: 8)",
    )
    bench.add_argument(
        "--finetune-epochs",
        type=int,
        default=3,
        help="for --models: distilled fine-tune epochs after pruning (default: 3)",
    )
    bench.set_defaults(func=cmd_bench)

    device = commands.add_parser(
        "device-bench",
        help="the GPU figures of scripts/device_check.sh: model alone (CUDA and TensorRT, "
        "FP16 and INT8), GPU decode alone, consumers end to end; JSON and Markdown",
    )
    device.add_argument("--out", required=True, help="folder for device_bench.json and .md")
    device.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="the same steps on the CPU with tiny sizes, to check the script (default: off)",
    )
    device.add_argument(
        "--budget-s",
        type=float,
        default=330.0,
        help="seconds for all the figures; later steps shrink to fit (default: 330)",
    )
    device.set_defaults(func=cmd_device_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # The ONNX exporter logs every optimizer pass at INFO.
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from infra.exceptions import TagstreamError

    try:
        return int(args.func(args) or 0)
    except TagstreamError as e:
        # Our own errors say what is wrong and what to do; a traceback adds nothing.
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
