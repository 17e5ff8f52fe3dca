"""Evaluation of served models on replayed traffic: what became of every photo of a run,
judged against the truth.

`tagstream evaluate` (tagstream/evaluate.py) replays an archive or a topic range through
the pipeline once per model and collects the run's records (Tweets, HashtagResults,
ShedRecords, DeadLetters). This module, free of Kafka, turns them into numbers:

- **truth**: a labels file (`Labels`: media key or tweet id to hashtags, JSON lines or
  CSV), or else the tweets' matching rules (`truth_from_rules`: the tags of the rules
  that name a class of the model, as targeted rules do);
- **accounting** (`account`): every tweet of the run ends as a shed record, a result or a
  dead letter per photo, or (a deletion) a retraction; what is missing is listed,
  duplicates are counted, and each photo gets one `PhotoOutcome`;
- **accuracy** (`accuracy`): per hashtag precision, recall, F1 and support of the
  hashtags served (the model's thresholds applied), micro and macro averages, top-1
  accuracy, the confusion matrix of top classes, and the calibration of the top score
  (reliability bins and the expected calibration error);
- **latency** (`latency`): percentiles per stage from the timestamps every result
  carries, and **throughput** over time; `busy_rate`: images per busy second of the
  inference consumers, from the batches the results came in.

The same records always give the same numbers: nothing here reads a clock or draws at
random. models/evaluation_report.py writes them as a report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.exceptions import ConfigurationError
from schemas.records import photos, retracts, rule_tags

# Truth -------------------------------------------------------------------------------

#: Truth of one photo: the classes it shows (by name, without '#'). Empty: no hashtag
#: applies (the model's no-hashtag class, such as ``others``). None: not known.
Truth = frozenset[str]


def _tag(text: str) -> str:
    return text.strip().lstrip("#").strip()


def _hashtags(value: Any, where: str) -> Truth:
    if isinstance(value, str):
        items: Iterable[Any] = _split_cell(value)
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigurationError(f"{where}: 'hashtags' must be a list of strings")
    tags = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"{where}: 'hashtags' must be a list of strings")
        if _tag(item):
            tags.append(_tag(item))
    return frozenset(tags)


def _split_cell(text: str) -> list[str]:
    for separator in (";", "|"):
        text = text.replace(separator, ",")
    return [part for part in text.split(",") if part.strip()]


@dataclass
class Labels:
    """The hashtags each photo (by media key) or each tweet's photos (by tweet id) should
    get. A media key's label wins over its tweet's."""

    path: Path
    by_media_key: dict[str, Truth] = field(default_factory=dict)
    by_tweet_id: dict[str, Truth] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Labels:
        """Read a labels file: JSON lines or CSV (by its suffix, else by its first byte).

        JSON lines: ``{"media_key": "3_1", "hashtags": ["#cats"]}`` or ``{"tweet_id":
        "17", "hashtags": []}`` (an empty list: no hashtag applies). CSV: a header with
        ``media_key`` and/or ``tweet_id`` and ``hashtags``, several hashtags in a cell
        separated by ``;``, ``|`` or ``,``. The ``#`` is optional. Raises
        ConfigurationError, naming the line, for anything else.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigurationError(f"no labels file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(f"labels file {path}: unreadable: {e}") from None
        labels = cls(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json") or (
            suffix != ".csv" and text.lstrip().startswith("{")
        ):
            labels._read_jsonl(text)
        else:
            labels._read_csv(text)
        if not labels.by_media_key and not labels.by_tweet_id:
            raise ConfigurationError(f"labels file {path}: no labels in it")
        return labels

    def _add(self, where: str, media_key: Any, tweet_id: Any, truth: Truth) -> None:
        given = [(k, v) for k, v in (("media_key", media_key), ("tweet_id", tweet_id)) if v]
        if len(given) != 1 or not isinstance(given[0][1], str | int):
            raise ConfigurationError(f"{where}: needs exactly one of 'media_key' and 'tweet_id'")
        kind, key = given[0][0], str(given[0][1])
        table = self.by_media_key if kind == "media_key" else self.by_tweet_id
        if key in table and table[key] != truth:
            raise ConfigurationError(
                f"{where}: {kind} {key!r} is labelled twice, differently "
                f"({sorted(table[key])} and {sorted(truth)})"
            )
        table[key] = truth

    def _read_jsonl(self, text: str) -> None:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"labels file {self.path}, line {number}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigurationError(f"{where}: not JSON: {e}") from None
            if not isinstance(obj, dict) or "hashtags" not in obj:
                raise ConfigurationError(f"{where}: expected an object with 'hashtags'")
            truth = _hashtags(obj["hashtags"], where)
            self._add(where, obj.get("media_key"), obj.get("tweet_id"), truth)

    def _read_csv(self, text: str) -> None:
        reader = csv.DictReader(io.StringIO(text))
        columns = set(reader.fieldnames or [])
        if "hashtags" not in columns or not columns & {"media_key", "tweet_id"}:
            raise ConfigurationError(
                f"labels file {self.path}: a CSV needs a header with 'hashtags' and "
                f"'media_key' or 'tweet_id' (found {sorted(columns) or 'none'})"
            )
        for row in reader:
            where = f"labels file {self.path}, line {reader.line_num}"
            if None in row:  # more cells than the header has columns
                raise ConfigurationError(f"{where}: more cells than the header names")
            media_key, tweet_id = row.get("media_key") or "", row.get("tweet_id") or ""
            if not (media_key.strip() or tweet_id.strip()):
                continue  # a blank line
            truth = _hashtags(row.get("hashtags") or "", where)
            self._add(where, media_key.strip(), tweet_id.strip(), truth)

    def __len__(self) -> int:
        return len(self.by_media_key) + len(self.by_tweet_id)

    def truth(self, tweet_id: str, media_key: str) -> Truth | None:
        if media_key in self.by_media_key:
            return self.by_media_key[media_key]
        return self.by_tweet_id.get(tweet_id)

    def names_any_of(self, tweets: Iterable[Mapping]) -> bool:
        """Whether any label names a tweet or a photo of `tweets`."""
        for tweet in tweets:
            if tweet["id"] in self.by_tweet_id:
                return True
            if any(p["media_key"] in self.by_media_key for p in photos(tweet)):
                return True
        return False

    def describe(self) -> str:
        return (
            f"labels file {self.path} ({len(self.by_media_key)} media keys, "
            f"{len(self.by_tweet_id)} tweet ids)"
        )


def write_labels(path: Path, by_media_key: Mapping[str, Iterable[str]]) -> Path:
    """A labels file of JSON lines, one photo per line, that `Labels.load` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for key, tags in by_media_key.items():
            line = {"media_key": key, "hashtags": [f"#{t}" for t in tags]}
            out.write(json.dumps(line) + "\n")
    return path


def truth_from_rules(tweet: Mapping, classes: Iterable[str]) -> Truth | None:
    """The classes named by the tags of the rules `tweet` matched (targeted rules are
    tagged with a class); None when it matched none of them."""
    named = frozenset(rule_tags(tweet)) & frozenset(classes)
    return named or None


# Accounting --------------------------------------------------------------------------

#: What became of a photo.
CLASSIFIED, SHED, DEAD_LETTER, RETRACTED, MISSING = (
    "classified",
    "shed",
    "dead_letter",
    "retracted",
    "missing",
)


@dataclass
class PhotoOutcome:
    """One photo of the run: its truth and what it became (one of the outcomes above)."""

    tweet_id: str
    media_key: str
    url: str
    truth: Truth | None
    outcome: str
    result: dict[str, Any] | None = None
    reason: str = ""  # the shed reason or the dead letter's stage


@dataclass
class Accounting:
    """What became of every tweet of a run."""

    tweets_in: int = 0
    deletes: int = 0
    not_tweets: int = 0  # input lines that were no tweet (dead letters of the replay)
    photos: int = 0
    results: int = 0
    cached: int = 0
    retracted: int = 0
    shed_tweets: Counter[str] = field(default_factory=Counter)
    shed_photos: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)  # by stage
    duplicates: Counter[str] = field(default_factory=Counter)
    missing_tweets: list[str] = field(default_factory=list)
    missing_photos: list[str] = field(default_factory=list)
    outcomes: list[PhotoOutcome] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return len(self.missing_tweets) + len(self.missing_photos)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tweets_in": self.tweets_in,
            "deletes": self.deletes,
            "not_tweets": self.not_tweets,
            "photos": self.photos,
            "results": self.results,
            "cached": self.cached,
            "retracted": self.retracted,
            "shed_tweets": dict(sorted(self.shed_tweets.items())),
            "shed_photos": self.shed_photos,
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "duplicates": dict(sorted(self.duplicates.items())),
            "missing_tweets": list(self.missing_tweets),
            "missing_photos": list(self.missing_photos),
        }


def _dead_key(letter: Mapping) -> tuple:
    return (
        letter["stage"],
        letter.get("media_key") or "",
        letter.get("tweet_id") or "",
        letter["source_topic"],
        letter["source_partition"],
        letter["source_offset"],
    )


def account(
    expected: Sequence[Mapping],
    *,
    tweets: Sequence[Mapping] = (),
    results: Sequence[Mapping] = (),
    shed: Sequence[Mapping] = (),
    dead_letters: Sequence[Mapping] = (),
    not_tweets: int = 0,
    truth_of: Any = None,
) -> Accounting:
    """What became of each of the `expected` tweets (the input, as replayed), from the
    run's records: the `tweets` read back (for duplicates), its `results` (retractions
    included), `shed` records and `dead_letters`. `not_tweets`: input lines that were
    no tweet (each should be a dead letter of stage ``replay``). `truth_of(tweet,
    photo)` gives each photo's truth (None: unknown).

    A photo's outcome is its result (the first not withdrawn by a retraction of the
    run), else its dead letter, else its tweet's shed record or dead letter, else it is
    missing. Repeats of a record (at-least-once delivery) count as duplicates.
    """
    acc = Accounting(not_tweets=not_tweets)
    by_id: dict[str, Mapping] = {}
    deletions: dict[str, None] = {}  # in input order
    expected_copies: Counter[str] = Counter()
    for tweet in expected:
        expected_copies[tweet["id"]] += 1
        if tweet.get("operation") == "delete":
            deletions[tweet["id"]] = None
        else:
            by_id[tweet["id"]] = tweet  # a later version of a post replaces the earlier

    withdrawals = [r for r in results if r.get("retraction")]
    retracted_ids = {w["tweet_id"] for w in withdrawals}
    first_result: dict[str, Mapping] = {}
    withdrawn: dict[str, Mapping] = {}
    result_copies: Counter[str] = Counter()
    for result in results:
        if result.get("retraction"):
            continue
        key = result["media_key"]
        result_copies[key] += 1
        if result["tweet_id"] in retracted_ids and any(retracts(w, result) for w in withdrawals):
            withdrawn.setdefault(key, result)
        else:
            first_result.setdefault(key, result)

    shed_by_id: dict[str, Mapping] = {}
    shed_copies: Counter[str] = Counter()
    for record in shed:
        shed_copies[record["tweet_id"]] += 1
        shed_by_id.setdefault(record["tweet_id"], record)

    dead_by_key: dict[str, Mapping] = {}
    dead_by_tweet: dict[str, Mapping] = {}
    dead_copies: Counter[tuple] = Counter()
    for letter in dead_letters:
        dead_copies[_dead_key(letter)] += 1
        if dead_copies[_dead_key(letter)] > 1:
            continue
        acc.dead_letters[letter["stage"]] += 1
        if letter.get("media_key"):
            dead_by_key.setdefault(letter["media_key"], letter)
        elif letter.get("tweet_id"):
            dead_by_tweet.setdefault(letter["tweet_id"], letter)

    read_copies = Counter(t["id"] for t in tweets)
    for tweet_id, tweet in by_id.items():
        acc.tweets_in += 1
        tweet_photos = photos(tweet)
        shed_record = shed_by_id.get(tweet_id)
        if shed_record is not None:
            acc.shed_tweets[shed_record["reason"]] += 1
        if not tweet_photos:
            done = shed_record is not None or tweet_id in dead_by_tweet
            acc.outcomes.append(
                PhotoOutcome(
                    tweet_id,
                    "",
                    "",
                    None,
                    SHED if shed_record else DEAD_LETTER if done else MISSING,
                    reason=shed_record["reason"] if shed_record else "",
                )
            )
            if not done:
                acc.missing_tweets.append(tweet_id)
            continue
        for photo in tweet_photos:
            key = photo["media_key"]
            acc.photos += 1
            truth = truth_of(tweet, photo) if truth_of is not None else None
            outcome = PhotoOutcome(tweet_id, key, photo.get("url") or "", truth, MISSING)
            if key in first_result:
                outcome.outcome, outcome.result = CLASSIFIED, dict(first_result[key])
                acc.results += 1
                acc.cached += bool(first_result[key].get("cached"))
            elif key in withdrawn:
                outcome.outcome = RETRACTED
                acc.retracted += 1
            elif key in dead_by_key:
                outcome.outcome, outcome.reason = DEAD_LETTER, dead_by_key[key]["stage"]
            elif shed_record is not None:
                outcome.outcome, outcome.reason = SHED, shed_record["reason"]
                acc.shed_photos += 1
            elif tweet_id in dead_by_tweet:
                outcome.outcome, outcome.reason = DEAD_LETTER, dead_by_tweet[tweet_id]["stage"]
            else:
                acc.missing_photos.append(key)
            acc.outcomes.append(outcome)

    for tweet_id in deletions:
        acc.deletes += 1
        if tweet_id not in retracted_ids:
            acc.missing_tweets.append(tweet_id)

    acc.duplicates = +Counter(
        {
            "tweets": sum(
                max(0, n - expected_copies[i])
                for i, n in read_copies.items()
                if i in expected_copies
            ),
            "results": sum(n - 1 for n in result_copies.values()),
            "shed": sum(n - 1 for n in shed_copies.values()),
            "dead letters": sum(n - 1 for n in dead_copies.values()),
        }
    )
    return acc


# Accuracy ----------------------------------------------------------------------------


@dataclass
class HashtagRow:
    hashtag: str
    support: int  # photos whose truth has it
    predicted: int  # photos served it
    true_positives: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.support if self.support else 0.0

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    def as_dict(self) -> dict[str, Any]:
        return {
            "hashtag": self.hashtag,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
            "predicted": self.predicted,
            "true_positives": self.true_positives,
        }


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@dataclass
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float  # mean top score in the bin
    accuracy: float  # share of the bin's photos whose top class is right


@dataclass
class AccuracyTable:
    """Accuracy of one model on the photos it classified that have a truth."""

    photos: int  # classified photos with a truth: what the table is over
    unlabelled: int  # classified photos without a truth
    rows: list[HashtagRow]
    top1_correct: int
    labels: list[str]  # of the confusion matrix: rows (truth) and columns (top class)
    confusion: list[list[int]]
    bins: list[ReliabilityBin]

    @property
    def top1(self) -> float:
        return self.top1_correct / self.photos if self.photos else 0.0

    @property
    def micro(self) -> tuple[float, float, float]:
        tp = sum(r.true_positives for r in self.rows)
        predicted = sum(r.predicted for r in self.rows)
        support = sum(r.support for r in self.rows)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        return precision, recall, _f1(precision, recall)

    @property
    def macro(self) -> tuple[float, float, float]:
        """Unweighted means over the hashtags in the truth or served (as scikit-learn's
        macro average over the labels present); an undefined value counts as 0."""
        if not self.rows:
            return 0.0, 0.0, 0.0
        n = len(self.rows)
        return (
            sum(r.precision for r in self.rows) / n,
            sum(r.recall for r in self.rows) / n,
            sum(r.f1 for r in self.rows) / n,
        )

    @property
    def ece(self) -> float:
        """Expected calibration error of the top score: sum over bins of share x |accuracy
        - confidence|."""
        if not self.photos:
            return 0.0
        return sum(b.count / self.photos * abs(b.accuracy - b.confidence) for b in self.bins)

    def as_dict(self) -> dict[str, Any]:
        micro, macro = self.micro, self.macro
        return {
            "photos": self.photos,
            "unlabelled": self.unlabelled,
            "top1_accuracy": self.top1,
            "top1_correct": self.top1_correct,
            "per_hashtag": [r.as_dict() for r in self.rows],
            "micro": dict(zip(("precision", "recall", "f1"), micro, strict=True)),
            "macro": dict(zip(("precision", "recall", "f1"), macro, strict=True)),
            "confusion": {"labels": self.labels, "matrix": self.confusion},
            "reliability": [b.__dict__ for b in self.bins],
            "ece": self.ece,
        }


#: The confusion matrix's row for a photo with no hashtag, of a model with no
#: no-hashtag class.
NO_HASHTAG_ROW = "(no hashtag)"


def top1_truth(truth: Truth, no_hashtag: Sequence[str]) -> frozenset[str]:
    """The top classes that are right for `truth`: its classes, or with none (no hashtag
    applies) the model's no-hashtag classes."""
    return truth if truth else frozenset(no_hashtag)


def accuracy(
    outcomes: Iterable[PhotoOutcome],
    *,
    classes: Sequence[str],
    no_hashtag: Sequence[str] = ("others",),
    bins: int = 10,
) -> AccuracyTable:
    """The accuracy table of the classified photos of `outcomes` that have a truth.

    Hashtags are compared as served (each result's ``hashtags``, the model's thresholds
    applied) with the truth's classes that are hashtags (not `no_hashtag`), per hashtag
    over the union of both. Top-1: the result's ``top_class`` against `top1_truth`. The
    confusion matrix counts a photo in the row of its top class when that is right,
    else of its first true class (sorted), and the column of its top class; its labels
    are `classes` then any other true class, sorted. Calibration: the top score in
    `bins` equal bins of [0, 1].
    """
    judged: list[tuple[frozenset[str], frozenset[str], str, float, frozenset[str]]] = []
    unlabelled = 0
    for o in outcomes:
        if o.outcome != CLASSIFIED or o.result is None:
            continue
        if o.truth is None:
            unlabelled += 1
            continue
        served = frozenset(_tag(h) for h in o.result.get("hashtags") or [])
        wanted = frozenset(t for t in o.truth if t not in no_hashtag)
        top = o.result["top_class"]
        score = float((o.result.get("scores") or {}).get(top, 0.0))
        judged.append((wanted, served, top, score, top1_truth(o.truth, no_hashtag)))

    names = sorted(set().union(*(w | s for w, s, *_ in judged)) if judged else set())
    rows = []
    for name in names:
        rows.append(
            HashtagRow(
                f"#{name}",
                support=sum(name in w for w, *_ in judged),
                predicted=sum(name in s for _, s, *_ in judged),
                true_positives=sum(name in w and name in s for w, s, *_ in judged),
            )
        )

    rows_of = [right or frozenset([NO_HASHTAG_ROW]) for *_, right in judged]
    extra = sorted(set().union(*rows_of) - set(classes)) if judged else []
    labels = list(classes) + extra
    index = {name: i for i, name in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    correct = 0
    for (_, _, top, _, right), row_names in zip(judged, rows_of, strict=True):
        hit = top in right
        correct += hit
        row = top if hit else sorted(row_names)[0]
        # A top class outside `classes` (a result of another model) has no column.
        if top in index:
            matrix[index[row]][index[top]] += 1

    edges = np.linspace(0.0, 1.0, bins + 1)
    reliability = []
    for b in range(bins):
        low, high = float(edges[b]), float(edges[b + 1])
        inside = [
            (score, top in right)
            for _, _, top, score, right in judged
            if low <= score < high or (b == bins - 1 and score == high)
        ]
        reliability.append(
            ReliabilityBin(
                low,
                high,
                len(inside),
                sum(s for s, _ in inside) / len(inside) if inside else 0.0,
                sum(h for _, h in inside) / len(inside) if inside else 0.0,
            )
        )
    return AccuracyTable(
        photos=len(judged),
        unlabelled=unlabelled,
        rows=rows,
        top1_correct=correct,
        labels=labels,
        confusion=matrix,
        bins=reliability,
    )


# Latency and throughput --------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    start: str  # timestamp names of HashtagResult.timestamps
    end: str
    spans: str


#: The stages of a result's way, from the timestamps it carries (schemas/records.py).
STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingested", "received", "source to the Faust agent (the tweets topic)"),
    Stage("admit", "received", "admitted", "the admission decision"),
    Stage("fetch", "admitted", "fetched", "the photo's download, with any wait for a slot"),
    # A post's photos go to `images` together, once the last of them is fetched.
    Stage("queue", "fetched", "consumed", "its post's other photos, images topic, consumer"),
    Stage("decode", "consumed", "decoded", "decoding and resizing the photo"),
    Stage("model", "decoded", "inferred", "waiting for its batch, and the model"),
    Stage("deliver", "inferred", "produced", "scores to hashtags, thumbnail, to the producer"),
    Stage("end to end", "ingested", "produced", "from the source to the result"),
)

PERCENTILES = (50, 90, 99)


@dataclass
class StageLatency:
    stage: Stage
    count: int
    p50: float
    p90: float
    p99: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "from": self.stage.start,
            "to": self.stage.end,
            "count": self.count,
            "p50_ms": self.p50,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "max_ms": self.max,
        }


def latency(results: Iterable[Mapping]) -> list[StageLatency]:
    """Percentiles (linear interpolation between ranks) of each stage, in ms, over the
    results that carry both of its timestamps (a cached result skips fetch to deliver)."""
    results = list(results)
    out = []
    for stage in STAGES:
        spans = [
            t[stage.end] - t[stage.start]
            for r in results
            if stage.start in (t := r.get("timestamps") or {}) and stage.end in t
        ]
        if spans:
            p50, p90, p99 = (float(v) for v in np.percentile(spans, PERCENTILES))
            out.append(StageLatency(stage, len(spans), p50, p90, p99, float(max(spans))))
        else:
            out.append(StageLatency(stage, 0, math.nan, math.nan, math.nan, math.nan))
    return out


def throughput(
    results: Iterable[Mapping], *, start_ms: float | None = None, buckets: int = 30
) -> tuple[float, list[tuple[float, float]]]:
    """Results per second over time, by when each was produced: (bucket width in s,
    [(seconds since `start_ms`, results/s)]). `start_ms` defaults to the first result's
    ingest time; the width is a round number of seconds, at least half a second (finer
    shows the batches, not the rate), giving at most about `buckets` buckets."""
    produced = sorted(
        r["timestamps"]["produced"] for r in results if "produced" in (r.get("timestamps") or {})
    )
    if not produced:
        return 1.0, []
    if start_ms is None:
        start_ms = min(
            (r["timestamps"].get("ingested", produced[0]) for r in results), default=produced[0]
        )
    span_s = max((produced[-1] - start_ms) / 1000.0, 1e-3)
    width = next(
        (w for w in (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600) if span_s / w <= buckets),
        3600.0,
    )
    counts: Counter[int] = Counter(int(max(0.0, t - start_ms) / 1000.0 // width) for t in produced)
    last = max(counts)
    return float(width), [((b + 0.5) * width, counts[b] / width) for b in range(last + 1)]


def busy_rate(results: Iterable[Mapping]) -> tuple[int, float]:
    """(images, images per busy second) of the inference consumers: each batch (the
    results of one consumer with the same ``inferred`` time) is busy from its first
    ``consumed`` to its last ``produced``; overlapping spans of a consumer count once."""
    batches: dict[tuple[str, float], list[float]] = {}
    images = 0
    for r in results:
        t = r.get("timestamps") or {}
        if r.get("cached") or not {"consumed", "inferred", "produced"} <= t.keys():
            continue
        images += 1
        span = batches.setdefault((r.get("consumer_id") or "", t["inferred"]), [math.inf, 0.0])
        span[0] = min(span[0], t["consumed"])
        span[1] = max(span[1], t["produced"])
    busy_ms = 0.0
    per_consumer: dict[str, list[list[float]]] = {}
    for (consumer, _), span in batches.items():
        per_consumer.setdefault(consumer, []).append(span)
    for spans in per_consumer.values():
        spans.sort()
        end = -math.inf
        for low, high in spans:
            if low > end:
                busy_ms += high - low
                end = high
            elif high > end:
                busy_ms += high - end
                end = high
    return images, images / (busy_ms / 1000.0) if busy_ms > 0 else 0.0
