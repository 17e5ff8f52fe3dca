"""X API v2 stream lines to Tweet records (schemas/Tweet.avsc).

Every X-shaped source (filtered stream, recent search, replay, synthetic) goes through
`tweet_from_stream_line`, so the `tweets` topic holds one shape whatever the source. The
v2 API sends media apart from the tweet, under ``includes.media``; here each tweet gets
its own media list back, in the order of its ``attachments.media_keys``.
"""

from __future__ import annotations

import html
from typing import Any

from infra.exceptions import CodecError
from schemas.records import MatchingRule, Media, Tweet, media, tweet


def _opt_str(obj: dict[str, Any], field: str, where: str) -> str | None:
    value = obj.get(field)
    if value is None or isinstance(value, str):
        return value
    raise CodecError(f"{where}: {field!r} must be a string, got {type(value).__name__}")


def _opt_int(obj: dict[str, Any], field: str, where: str) -> int | None:
    value = obj.get(field)
    if value is None:
        return None
    # bool is an int subclass; a true width is a bug upstream, not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{where}: {field!r} must be an integer, got {type(value).__name__}")
    return value


def _media(line: dict[str, Any], data: dict[str, Any], where: str) -> list[Media]:
    attachments = data.get("attachments")
    if attachments is None:
        return []
    if not isinstance(attachments, dict):
        raise CodecError(f"{where}: 'attachments' must be an object")
    keys = attachments.get("media_keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CodecError(f"{where}: 'attachments.media_keys' must be a list of strings")

    includes = line.get("includes") or {}
    if not isinstance(includes, dict):
        raise CodecError(f"{where}: 'includes' must be an object")
    included = includes.get("media") or []
    if not isinstance(included, list):
        raise CodecError(f"{where}: 'includes.media' must be a list")
    by_key: dict[str, dict[str, Any]] = {}
    for item in included:
        if not isinstance(item, dict) or not isinstance(item.get("media_key"), str):
            raise CodecError(f"{where}: every 'includes.media' item needs a string 'media_key'")
        by_key[item["media_key"]] = item

    found: list[Media] = []
    seen: set[str] = set()
    for key in keys:
        item = by_key.get(key)
        # The API leaves out media it could not expand (deleted, withheld): skip, not fail.
        if item is None or key in seen:
            continue
        seen.add(key)
        at = f"{where}, media {key!r}"
        mtype = item.get("type")
        if not isinstance(mtype, str) or not mtype:
            raise CodecError(f"{at}: 'type' must be a non-empty string")
        found.append(
            media(
                media_key=key,
                type=mtype,
                # Only photos have a fetchable url; a video's url would be its page.
                url=_opt_str(item, "url", at) if mtype == "photo" else None,
                preview_image_url=_opt_str(item, "preview_image_url", at),
                width=_opt_int(item, "width", at),
                height=_opt_int(item, "height", at),
                alt_text=_opt_str(item, "alt_text", at),
            )
        )
    return found


def _rules(line: dict[str, Any], where: str) -> list[MatchingRule]:
    rules = line.get("matching_rules") or []
    if not isinstance(rules, list):
        raise CodecError(f"{where}: 'matching_rules' must be a list")
    out: list[MatchingRule] = []
    for rule in rules:
        if not isinstance(rule, dict):
            raise CodecError(f"{where}: every matching rule must be an object")
        rule_id = rule.get("id")
        # Older API versions sent rule ids as numbers.
        if isinstance(rule_id, int) and not isinstance(rule_id, bool):
            rule_id = str(rule_id)
        if not isinstance(rule_id, str):
            raise CodecError(f"{where}: matching rule without a string 'id'")
        out.append(MatchingRule(id=rule_id, tag=_opt_str(rule, "tag", f"{where}, rule {rule_id}")))
    return out


def tweet_from_stream_line(
    line: dict[str, Any],
    *,
    source: str,
    ingested_at_ms: float,
    replay_run_id: str | None = None,
    network: str = "x",
) -> Tweet:
    """The Tweet record (schemas/records.py) of one v2 stream line.

    `network` is ``x`` for lines from X (the post's web page is then known) and
    ``synthetic`` for the demo's made-up lines.

    Raises `CodecError` for a line that is not a tweet: not an object, no ``data``
    object (such as an error line), no string ``id`` or ``text``, or fields of the wrong
    type. Attachment keys missing from ``includes`` are skipped.
    """
    if not isinstance(line, dict):
        raise CodecError(f"stream line must be a JSON object, got {type(line).__name__}")
    data = line.get("data")
    if not isinstance(data, dict):
        errors = line.get("errors")
        detail = f" (errors: {errors!r:.200})" if errors else ""
        raise CodecError(f"stream line has no 'data' object{detail}")
    tweet_id = data.get("id")
    if not isinstance(tweet_id, str) or not tweet_id:
        raise CodecError(f"stream line has no string 'data.id' (got {tweet_id!r:.50})")
    where = f"tweet {tweet_id}"
    text = data.get("text")
    if not isinstance(text, str):
        raise CodecError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    return tweet(
        id=tweet_id,
        # X API v2 sends tweet text with &, < and > as entities; the record holds the text
        # itself, and every display escapes it once, where it is shown.
        text=html.unescape(text),
        author_id=_opt_str(data, "author_id", where),
        created_at=_opt_str(data, "created_at", where),
        media=_media(line, data, where),
        matching_rules=_rules(line, where),
        source=source,
        ingested_at_ms=ingested_at_ms,
        replay_run_id=replay_run_id,
        network=network,
        post_id=tweet_id,
        post_url=f"https://x.com/i/web/status/{tweet_id}" if network == "x" else None,
    )
