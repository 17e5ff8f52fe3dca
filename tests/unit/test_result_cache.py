"""The result cache: by media key, URL or bytes, one model at a time, bounded."""

from __future__ import annotations

from processors.result_cache import ResultCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def result(media_key: str, url: str, *, version: str = "1", **extra) -> dict:
    return {
        "media_key": media_key,
        "url": url,
        "hashtags": ["#cats"],
        "top_class": "cats",
        "scores": {"cats": 0.9},
        "model_id": "m",
        "model_version": version,
        "thumbnail": b"jpg",
    } | extra


def test_found_by_media_key_url_or_bytes() -> None:
    cache = ResultCache(max_entries=10, ttl_s=60, clock=Clock())
    cache.note_image("3_1", "sha-a")
    cache.add(result("3_1", "http://h/a.jpg"))
    assert cache.lookup(media_key="3_1").top_class == "cats"  # a retweet
    assert cache.lookup(media_key="other", url="http://h/a.jpg").media_key == "3_1"  # a repost
    assert cache.lookup(media_key="x", url="http://y", sha256="sha-a") is not None  # a copy
    assert cache.lookup(media_key="x", url="http://y", sha256="sha-b") is None


def test_only_the_newest_models_results_are_used() -> None:
    cache = ResultCache(max_entries=10, ttl_s=60, clock=Clock())
    cache.add(result("3_1", "http://h/a.jpg", version="1"))
    cache.add(result("3_2", "http://h/b.jpg", version="2"))  # the consumers were upgraded
    assert cache.lookup(media_key="3_1") is None
    assert cache.lookup(media_key="3_2").model_version == "2"


def test_bounded_and_expiring_and_cached_answers_are_not_kept() -> None:
    clock = Clock()
    cache = ResultCache(max_entries=4, ttl_s=10, clock=clock)
    for n in range(10):
        cache.add(result(f"3_{n}", f"http://h/{n}.jpg"))
    assert len(cache) == 4  # two keys each: the two newest photos
    assert cache.lookup(media_key="3_9") and not cache.lookup(media_key="3_7")
    clock.now = 11
    assert cache.lookup(media_key="3_9") is None
    cache.add(result("3_20", "http://h/20.jpg", cached=True))
    assert cache.lookup(media_key="3_20") is None
    assert ResultCache(max_entries=0, ttl_s=1).lookup(media_key="3_9") is None
