"""One realistic value of every record, shared by the codec, interop and consumer tests."""

from __future__ import annotations

from typing import Any

from infra.topics import TOPIC_RECORDS

# One realistic value per record, every field given, so a round trip must return it as is.
# Floats of HashtagResult.scores are Avro "float": values exact in 32 bits.
VALUES: dict[str, dict[str, Any]] = {
    "Tweet": {
        "id": "1790000000000000001",
        "text": "Sunset over the harbour 🌅 #photography",
        "author_id": "2244994945",
        "created_at": "2024-05-13T18:04:11.000Z",
        "media": [
            {
                "media_key": "3_1790000000000000001",
                "type": "photo",
                "url": "https://pbs.twimg.com/media/GNa1.jpg",
                "preview_image_url": None,
                "width": 1200,
                "height": 800,
                "alt_text": "orange sky over boats",
            },
            {
                "media_key": "7_1790000000000000002",
                "type": "video",
                "url": None,
                "preview_image_url": "https://pbs.twimg.com/ext_tw_video_thumb/2.jpg",
                "width": None,
                "height": None,
                "alt_text": None,
            },
        ],
        "matching_rules": [
            {"id": "1650000000000000000", "tag": "photos"},
            {"id": "9", "tag": None},
        ],
        "source": "twitter",
        "ingested_at_ms": 1715623451123.5,
        "replay_run_id": None,
        "network": "x",
        "post_id": "1790000000000000001",
        "post_url": "https://x.com/i/web/status/1790000000000000001",
        "langs": ["en"],
        "tags": ["photography"],
        "operation": "create",
        "revision": None,
    },
    "ImageEvent": {
        "tweet_id": "1790000000000000001",
        "media_key": "3_1790000000000000001",
        "url": "https://pbs.twimg.com/media/GNa1.jpg",
        "position": 0,
        "tweet_text": "Sunset over the harbour",
        "matching_rules": ["photos"],
        "content_type": "image/jpeg",
        "image": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) + b"\xff\xd9",
        "source": "replay",
        "replay_run_id": "run-2024-05-13",
        "timestamps": {"ingested": 1715623451123.5, "admitted": 1715623451124.0},
    },
    "HashtagResult": {
        "tweet_id": "1790000000000000001",
        "media_key": "3_1790000000000000001",
        "url": "https://pbs.twimg.com/media/GNa1.jpg",
        "tweet_text": "Sunset over the harbour",
        "hashtags": ["#sunset", "#harbour", "#boats"],
        "top_class": "seashore",
        "scores": {"seashore": 0.75, "boathouse": 0.125, "lakeside": 0.0625},
        "model_id": "mobilenet_v3_small",
        "model_version": "2024.05.1",
        "consumer_id": "gpu-host-4242",
        "provider": "tensorrt",
        "precision": "int8",
        "source": "twitter",
        "replay_run_id": None,
        "thumbnail": b"\xff\xd8\xff\xdbthumb\xff\xd9",
        "timestamps": {"ingested": 1715623451123.5, "inferred": 1715623451301.25},
        "cached": False,
        "retraction": False,
    },
    "ShedRecord": {
        "tweet_id": "1790000000000000003",
        "reason": "over_rate",
        "detail": "bucket empty",
        "media_keys": ["3_1790000000000000003", "3_1790000000000000004"],
        "admission_rate": 50.0,
        "observed_rate": 212.5,
        "tokens": 0.25,
        "source": "synthetic",
        "replay_run_id": None,
        "shed_at_ms": 1715623451400.0,
        "priority": "low",
        "controller_mode": "closed_loop",
        "capacity_images_per_s": 120.5,
        "backlog_images": 40.0,
        "estimated_delay_ms": 332.0,
        "admitted_images_per_s": 101.25,
    },
    "DeadLetter": {
        "source_topic": "tweets",
        "source_partition": 3,
        "source_offset": 123456789012,
        "stage": "decode_tweet",
        "error_class": "CodecError",
        "message": "cannot decode Tweet: empty input",
        "tweet_id": None,
        "media_key": None,
        "url": None,
        "payload": b"\x00\x01garbage",
        "failed_at_ms": 1715623451500.0,
    },
    "CapacityReport": {
        "consumer_id": "gpu-host-4242",
        "images_per_s": 812.5,
        "batch_size": 27.75,
        "queue_depth": 1500,
        "reported_at_ms": 1715623452000.0,
    },
}

#: The topic (short name) that carries each record.
TOPICS: dict[str, str] = {record: topic for topic, record in TOPIC_RECORDS.items()}
