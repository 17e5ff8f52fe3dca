"""The evaluation's numbers (models/evaluation.py), on records made by hand.

Each number is checked against an independent computation: scikit-learn's metrics for
precision, recall and F1 (micro and macro), NumPy for percentiles, and hand counts for
top-1, the confusion matrix, calibration, accounting and busy time.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from infra.exceptions import ConfigurationError
from models.evaluation import (
    CLASSIFIED,
    DEAD_LETTER,
    MISSING,
    RETRACTED,
    SHED,
    STAGES,
    Labels,
    PhotoOutcome,
    account,
    accuracy,
    busy_rate,
    latency,
    throughput,
    truth_from_rules,
    write_labels,
)
from schemas import records

CLASSES = ["cats", "dogs", "cow", "others"]


def post(tweet_id: str, *keys: str, rules: tuple[str, ...] = (), operation: str = "create"):
    return records.tweet(
        id=tweet_id,
        text="",
        source="replay",
        ingested_at_ms=0.0,
        media=[records.media(media_key=k, type="photo", url=f"http://x/{k}.jpg") for k in keys],
        matching_rules=[records.MatchingRule(id=f"r{i}", tag=t) for i, t in enumerate(rules)],
        operation=operation,
    )


def result(tweet_id: str, key: str, top: str, hashtags=(), score=0.9, **extra) -> dict:
    scores = {c: (score if c == top else (1 - score) / 3) for c in CLASSES}
    return {
        "tweet_id": tweet_id,
        "media_key": key,
        "top_class": top,
        "hashtags": list(hashtags),
        "scores": scores,
        "retraction": False,
        "timestamps": {"ingested": 1.0},
        **extra,
    }


def letter(stage: str, *, media_key=None, tweet_id=None, offset=1) -> dict:
    return {
        "stage": stage,
        "media_key": media_key,
        "tweet_id": tweet_id,
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": offset,
    }


# Labels --------------------------------------------------------------------------------


def test_labels_from_json_lines_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        '{"media_key": "3_1", "hashtags": ["#cats"]}\n'
        "\n"
        '{"tweet_id": "17", "hashtags": ["dogs", "#cow"]}\n'
        '{"media_key": "3_9", "hashtags": []}\n'
    )
    labels = Labels.load(jsonl)
    assert labels.truth("1", "3_1") == {"cats"}
    assert labels.truth("17", "3_2") == {"dogs", "cow"}  # by its tweet
    assert labels.truth("17", "3_9") == frozenset()  # the media key wins: no hashtag
    assert labels.truth("18", "3_3") is None
    assert len(labels) == 3

    table = tmp_path / "labels.csv"
    table.write_text("media_key,tweet_id,hashtags\n3_1,,#cats\n,17,dogs;#cow\n3_9,,\n\n")
    assert Labels.load(table) == Labels(
        table, by_media_key=labels.by_media_key, by_tweet_id=labels.by_tweet_id
    )
    # Without a telling suffix the first byte decides.
    plain = tmp_path / "labels.txt"
    plain.write_text(jsonl.read_text())
    assert Labels.load(plain).by_media_key == labels.by_media_key


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("a.jsonl", '{"media_key": "1", "hashtags": ["x"]}\n{oops\n', "line 2: not JSON"),
        ("a.jsonl", '{"media_key": "1"}\n', "line 1: expected an object with 'hashtags'"),
        ("a.jsonl", '{"media_key": "1", "tweet_id": "2", "hashtags": []}\n', "exactly one"),
        ("a.jsonl", '{"hashtags": ["x"]}\n', "exactly one"),
        ("a.jsonl", '{"media_key": "1", "hashtags": "x"}\n{"media_key": "1", "hashtags": []}\n',
         "labelled twice"),
        ("a.jsonl", '{"media_key": "1", "hashtags": [1]}\n', "list of strings"),
        ("a.csv", "key,tags\n1,x\n", "a CSV needs a header"),
        ("a.csv", "media_key,hashtags\n1,x,y\n", "line 2: more cells"),
        ("a.jsonl", "\n\n", "no labels in it"),
    ],
)  # fmt: skip
def test_bad_labels_files_are_one_clear_error(tmp_path: Path, name, text, says) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=says) as caught:
        Labels.load(path)
    assert str(path) in str(caught.value)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no labels file at"):
        Labels.load(tmp_path / "nope.jsonl")


def test_labels_round_trip_and_name_the_replay(tmp_path: Path) -> None:
    path = write_labels(tmp_path / "l.jsonl", {"3_1": ["cats"], "3_2": []})
    labels = Labels.load(path)
    assert labels.by_media_key == {"3_1": {"cats"}, "3_2": frozenset()}
    assert labels.names_any_of([post("9", "3_2")])
    assert not labels.names_any_of([post("9", "3_7"), post("3_1")])  # an id is not a key


def test_truth_from_rules_keeps_the_tags_that_name_a_class() -> None:
    assert truth_from_rules(post("1", rules=("cats", "pets")), CLASSES) == {"cats"}
    assert truth_from_rules(post("1", rules=("cats", "dogs")), CLASSES) == {"cats", "dogs"}
    assert truth_from_rules(post("1", rules=("pets",)), CLASSES) is None
    assert truth_from_rules(post("1"), CLASSES) is None


# Accounting ----------------------------------------------------------------------------


def test_every_photo_gets_one_outcome_and_what_is_missing_is_listed() -> None:
    tweets = [
        post("1", "a", "b"),  # a: result; b: dead letter (fetch)
        post("2", "c"),  # shed over_rate
        post("3"),  # shed no_photo
        post("4", "d"),  # the tweet dead-lettered whole
        post("5", "e", "f"),  # e: result, twice; f: missing
        post("6"),  # missing (no shed record)
        post("7", "g"),  # retracted by a deletion
        post("7", operation="delete"),
        post("8", operation="delete"),  # a deletion never retracted: missing
    ]
    deletion_ingested = 5.0
    got = account(
        tweets,
        tweets=[*tweets, tweets[0]],  # one tweet delivered twice
        results=[
            result("1", "a", "cats", ["#cats"]),
            result("5", "e", "dogs", ["#dogs"]),
            result("5", "e", "dogs", ["#dogs"]),
            result("7", "g", "cow", ["#cow"]),
            {
                "tweet_id": "7",
                "media_key": "",
                "retraction": True,
                "timestamps": {"ingested": deletion_ingested},
            },
        ],
        shed=[{"tweet_id": "2", "reason": "over_rate"}, {"tweet_id": "3", "reason": "no_photo"}],
        dead_letters=[
            letter("fetch", media_key="b", tweet_id="1"),
            letter("fetch", media_key="b", tweet_id="1"),  # the same letter again
            letter("decode_tweet", tweet_id="4", offset=7),
            letter("replay", offset=3),
        ],
        not_tweets=1,
        truth_of=lambda t, p: frozenset({"cats"}) if p["media_key"] == "a" else None,
    )
    outcome = {o.media_key or o.tweet_id: (o.outcome, o.reason) for o in got.outcomes}
    assert outcome == {
        "a": (CLASSIFIED, ""),
        "b": (DEAD_LETTER, "fetch"),
        "c": (SHED, "over_rate"),
        "3": (SHED, "no_photo"),
        "d": (DEAD_LETTER, "decode_tweet"),
        "e": (CLASSIFIED, ""),
        "f": (MISSING, ""),
        "6": (MISSING, ""),
        "g": (RETRACTED, ""),
    }
    assert [o.truth for o in got.outcomes if o.media_key == "a"] == [{"cats"}]
    assert got.tweets_in == 7 and got.deletes == 2 and got.photos == 7
    assert got.results == 2 and got.retracted == 1 and got.shed_photos == 1
    assert got.shed_tweets == {"over_rate": 1, "no_photo": 1}
    assert got.dead_letters == {"fetch": 1, "decode_tweet": 1, "replay": 1}
    assert got.duplicates == {"tweets": 1, "results": 1, "dead letters": 1}
    assert got.missing_photos == ["f"] and got.missing_tweets == ["6", "8"]
    assert got.missing == 3 and got.not_tweets == 1


def test_a_result_ingested_after_a_retraction_is_kept() -> None:
    # An edit: the retraction withdraws the first version's result, not the second's.
    old = dict(result("7", "g", "cow"), timestamps={"ingested": 1.0})
    new = dict(result("7", "g", "dogs"), timestamps={"ingested": 9.0})
    withdrawal = {"tweet_id": "7", "media_key": "", "retraction": True}
    withdrawal["timestamps"] = {"ingested": 5.0}
    got = account([post("7", "g")], results=[old, withdrawal, new])
    [photo] = got.outcomes
    assert photo.outcome == CLASSIFIED and photo.result["top_class"] == "dogs"


# Accuracy ------------------------------------------------------------------------------


def outcomes_of(rows) -> list[PhotoOutcome]:
    """(truth or None, top class, hashtags served, top score) per classified photo."""
    out = []
    for n, (truth, top, served, score) in enumerate(rows):
        r = result(str(n), f"k{n}", top, served, score)
        out.append(
            PhotoOutcome(str(n), f"k{n}", "", None if truth is None else frozenset(truth), "c", r)
        )
        out[-1].outcome = CLASSIFIED
    return out


ROWS = [
    ({"cats"}, "cats", ["#cats"], 0.95),
    ({"cats"}, "dogs", ["#dogs"], 0.55),
    ({"cats", "dogs"}, "dogs", ["#dogs", "#cats"], 0.75),
    ({"dogs"}, "dogs", [], 0.45),  # right top class, below the threshold
    (set(), "others", [], 0.85),  # no hashtag applies, none served
    (set(), "cow", ["#cow"], 0.65),  # no hashtag applies, one served
    ({"horse"}, "cow", ["#cow"], 0.99),  # a label the model does not know
    (None, "cats", ["#cats"], 0.9),  # no truth: not judged
]


def test_accuracy_per_hashtag_matches_scikit_learn() -> None:
    table = accuracy(outcomes_of(ROWS), classes=CLASSES, no_hashtag=["others"])
    judged = [r for r in ROWS if r[0] is not None]
    truth = [{t for t in r[0] if t != "others"} for r in judged]
    served = [{h.lstrip("#") for h in r[2]} for r in judged]
    names = sorted(set().union(*truth, *served))
    binarizer = MultiLabelBinarizer(classes=names)
    y_true, y_pred = binarizer.fit_transform(truth), binarizer.transform(served)
    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    assert [row.hashtag for row in table.rows] == [f"#{n}" for n in names]
    for i, row in enumerate(table.rows):
        assert (row.precision, row.recall, row.f1) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert row.support == support[i]
    for average, got in (("micro", table.micro), ("macro", table.macro)):
        want = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert got == pytest.approx(want[:3], abs=1e-12)
    assert table.photos == 7 and table.unlabelled == 1


def test_top1_confusion_and_calibration_counted_by_hand() -> None:
    table = accuracy(outcomes_of(ROWS), classes=CLASSES, no_hashtag=["others"])
    # Right: cats/cats, cats+dogs/dogs, dogs/dogs, none/others.
    assert table.top1_correct == 4 and table.top1 == pytest.approx(4 / 7)
    assert table.labels == [*CLASSES, "horse"]
    m = np.array(table.confusion)
    idx = {n: i for i, n in enumerate(table.labels)}
    assert m.sum() == 7 and np.trace(m) == 4
    assert m[idx["cats"], idx["dogs"]] == 1  # a cat called a dog
    assert m[idx["others"], idx["cow"]] == 1  # nothing to tag, tagged cow
    assert m[idx["horse"], idx["cow"]] == 1
    assert m[idx["dogs"], idx["dogs"]] == 2
    # Ten bins of the top score: 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.99.
    counts = [b.count for b in table.bins]
    assert counts == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    scores = [0.95, 0.55, 0.75, 0.45, 0.85, 0.65, 0.99]
    right = [1, 0, 1, 1, 1, 0, 0]
    bins = {}
    for s, h in zip(scores, right, strict=True):
        bins.setdefault(min(int(s * 10), 9), []).append((s, h))
    ece = sum(
        len(v) / 7 * abs(np.mean([h for _, h in v]) - np.mean([s for s, _ in v]))
        for v in bins.values()
    )
    assert table.ece == pytest.approx(ece, abs=1e-12)


def test_a_model_without_a_no_hashtag_class_gets_a_row_for_it() -> None:
    rows = [(set(), "cats", [], 0.6), ({"cats"}, "cats", ["#cats"], 0.9)]
    table = accuracy(outcomes_of(rows), classes=["cats", "dogs"], no_hashtag=[])
    assert table.labels == ["cats", "dogs", "(no hashtag)"]
    assert table.confusion[2][0] == 1 and table.top1_correct == 1


def test_nothing_to_judge_is_an_empty_table() -> None:
    table = accuracy(outcomes_of([(None, "cats", [], 0.9)]), classes=CLASSES)
    assert table.photos == 0 and table.rows == [] and table.top1 == 0.0 and table.ece == 0.0


# Latency, throughput and busy time -------------------------------------------------------


def timed(start: float, step: float, **extra) -> dict:
    names = [
        "ingested",
        "received",
        "admitted",
        "fetch_start",
        "fetched",
        "consumed",
        "decoded",
        "inferred",
        "produced",
    ]
    return {"timestamps": {n: start + i * step for i, n in enumerate(names)}, **extra}


def test_latency_percentiles_per_stage() -> None:
    results = [timed(1000.0 * i, 1.0 + i) for i in range(20)]
    results.append({"timestamps": {"ingested": 0.0, "received": 1.0, "produced": 5.0}})  # cached
    stages = {s.stage.name: s for s in latency(results)}
    assert list(stages) == [s.name for s in STAGES]
    ingest = [1.0 + i for i in range(20)] + [1.0]
    assert stages["ingest"].count == 21
    assert (stages["ingest"].p50, stages["ingest"].p90, stages["ingest"].p99) == pytest.approx(
        tuple(np.percentile(ingest, [50, 90, 99]))
    )
    assert stages["fetch"].count == 20 and stages["fetch"].max == 2 * 20.0  # admitted->fetched
    e2e = [8 * (1.0 + i) for i in range(20)] + [5.0]
    assert stages["end to end"].max == max(e2e)
    assert math.isnan(latency([])[0].p50)


def test_throughput_buckets_by_production_time() -> None:
    results = [{"timestamps": {"ingested": 0.0, "produced": t}} for t in (100, 200, 1600, 1700)]
    width, points = throughput(results, start_ms=0.0)
    assert width == 0.5
    assert points == [(0.25, 4.0), (0.75, 0.0), (1.25, 0.0), (1.75, 4.0)]
    assert throughput([]) == (1.0, [])


def test_busy_rate_counts_overlapping_batches_once() -> None:
    def r(consumer, consumed, inferred, produced, **extra):
        t = {"consumed": consumed, "inferred": inferred, "produced": produced}
        return {"consumer_id": consumer, "timestamps": t, **extra}

    results = [
        r("a", 0, 400, 500),
        r("a", 100, 400, 450),  # the same batch: 0..500
        r("a", 450, 900, 1000),  # the next, overlapping: counts 500..1000
        r("b", 0, 200, 250),  # another consumer: its own 250 ms
        r("a", 0, 0, 0, cached=True),  # no inference: not counted
    ]
    images, rate = busy_rate(results)
    assert images == 4 and rate == pytest.approx(4 / 1.25)
    assert busy_rate([]) == (0, 0.0)
