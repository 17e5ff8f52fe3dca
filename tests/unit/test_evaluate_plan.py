"""`tagstream evaluate`'s checks and plan (tagstream/evaluate.py), before anything starts:
the input read once, its hashes, the truth, and the settings each run gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.exceptions import ConfigurationError, ModelError
from infra.settings import Settings
from models.evaluation import write_labels
from models.manifest import Manifest, file_sha256
from producers.archive import StreamArchive
from tagstream.evaluate import plan_evaluation


def fake_model(folder: Path, classes=("cats", "dogs", "others")) -> Path:
    """A model folder whose manifest checks out (the runs would load it; a plan does not)."""
    if (folder / "manifest.json").exists():
        return folder
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not really onnx")
    Manifest(
        model_id="fake",
        version="1",
        classes=list(classes),
        thresholds={c: 0.5 for c in classes},
        input_size=64,
        resize_size=64,
        mean=[0.5] * 3,
        std=[0.2] * 3,
        file="model.onnx",
        sha256=file_sha256(folder / "model.onnx"),
    ).save(folder)
    return folder


def line(tweet_id: str, key: str | None, tag: str = "cats") -> dict:
    out: dict = {"data": {"id": tweet_id, "text": "x"}, "matching_rules": [{"id": "1", "tag": tag}]}
    if key:
        out["data"]["attachments"] = {"media_keys": [key]}
        out["includes"] = {"media": [{"media_key": key, "type": "photo", "url": f"http://h/{key}"}]}
    return out


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    with StreamArchive(tmp_path / "archive") as a:
        a.write(line("1", "3_1"), t_ms=1.0)
        a.write(line("2", "3_2", tag="pets"), t_ms=2.0)
        a.write(b"{garbage", t_ms=3.0)
        a.write(line("3", None), t_ms=4.0)
    return tmp_path / "archive"


def plan(tmp_path: Path, **kwargs):
    settings = kwargs.pop("settings", Settings(data_dir=tmp_path / "data"))
    kwargs.setdefault("model_dirs", [fake_model(tmp_path / "m")])
    return plan_evaluation(settings, out=tmp_path / "out", progress=False, **kwargs)


def test_the_input_is_read_once_with_its_hashes(tmp_path: Path, archive: Path) -> None:
    first = plan(tmp_path, archive=archive)
    assert [t["id"] for t in first.source.tweets] == ["1", "2", "3"]
    assert first.source.not_tweets == 1
    again = plan_evaluation(
        Settings(data_dir=tmp_path / "data"),
        archive=archive,
        model_dirs=[tmp_path / "m"],
        out=tmp_path / "out",
    )
    # The same archive: the same hashes, though every read stamps new ingest times.
    assert again.source.files_sha256 == first.source.files_sha256
    assert again.source.tweets_sha256() == first.source.tweets_sha256()
    described = first.source.describe()
    assert described["kind"] == "archive" and described["tweets"] == 3
    bounded = plan(tmp_path, archive=archive, start=1, stop=3, model_dirs=[tmp_path / "m"])
    assert [t["id"] for t in bounded.source.tweets] == ["2"]
    assert bounded.source.describe() | {"from": 1, "to": 3} == bounded.source.describe()


def test_truth_from_rules_without_labels_and_from_labels_with(
    tmp_path: Path, archive: Path
) -> None:
    by_rules = plan(tmp_path, archive=archive)
    one, two, _ = by_rules.source.tweets
    assert by_rules.truth_of(one, one["media"][0]) == {"cats"}
    assert by_rules.truth_of(two, two["media"][0]) is None  # a general rule names no class
    labels = write_labels(tmp_path / "l.jsonl", {"3_2": ["dogs"]})
    by_labels = plan(tmp_path, archive=archive, labels=labels, model_dirs=[tmp_path / "m"])
    assert by_labels.truth_of(two, two["media"][0]) == {"dogs"}
    assert by_labels.truth_of(one, one["media"][0]) is None


def test_each_run_sheds_nothing_unless_told_to_admit_as_configured(
    tmp_path: Path, archive: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", topic_prefix="p-", result_cache_size=7)
    none = plan(tmp_path, archive=archive, settings=settings, demo_images=True)
    s = none.run_settings(2, tmp_path / "m")
    assert s.topic_prefix == f"p-eval-{none.evaluation_id}-m2-"
    assert (s.admission_mode, s.result_cache_size) == ("fixed", 0)
    assert s.admission_rate >= 1e9 and s.admission_burst >= 1e9
    assert s.model_dir == (tmp_path / "m").resolve() and s.consumer_id == "evaluate-m2"
    assert settings.image_server_host in s.fetch_allow_hosts
    configured = plan(
        tmp_path,
        archive=archive,
        settings=settings,
        admission="configured",
        model_dirs=[tmp_path / "m"],
    )
    s = configured.run_settings(1, tmp_path / "m")
    assert (s.admission_mode, s.admission_rate, s.result_cache_size) == ("closed_loop", 1000.0, 7)
    assert s.fetch_allow_hosts == []


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"speed": "fast"}, ConfigurationError, "expected like '1x'"),
        ({"admission": "some"}, ConfigurationError, "admission must be one of"),
        ({"wait_s": 0}, ConfigurationError, "must be positive"),
        ({"archive": None, "topic": "tweets"}, ConfigurationError, "set TAGSTREAM_KAFKA_BOOTSTRAP"),
        ({"model_dirs": ["nowhere"]}, ModelError, "no manifest.json in nowhere"),
    ],
)
def test_bad_arguments_fail_before_anything_starts(
    tmp_path: Path, archive: Path, kwargs, error, says
) -> None:
    with pytest.raises(error, match=says):
        plan(tmp_path, **({"archive": archive} | kwargs))


def test_an_archive_without_tweets_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="holds no archive file"):
        plan(tmp_path, archive=tmp_path / "empty")
    with StreamArchive(tmp_path / "junk") as a:
        a.write(b"{no", t_ms=1.0)
    with pytest.raises(ConfigurationError, match="holds no tweet"):
        plan(tmp_path, archive=tmp_path / "junk", model_dirs=[tmp_path / "m"])
