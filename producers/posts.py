"""What the sources of open networks (Bluesky, Mastodon) share: which posts they keep.

X filters on its servers (the stream's rules); Jetstream and Mastodon's public streams
send every post, so these sources filter here, all in the same way (`PostGate`):

- a post is kept when it has a photo and matches the tag filter (`TagFilter`): one of a
  class's words (``cats`` gives ``cat`` and ``cats``) among the post's own hashtags, or
  else among the words of its text. Each class it matched becomes a matching rule, tagged
  with the class name (what evaluation takes as truth) and with an id that says how it
  matched (``hashtag:cat``, ``word:cats``). Without a filter every post with a photo is
  kept, with no rule;
- a deletion is forwarded only for a post this source produced (it remembers the last
  `REMEMBERED_POSTS`): the networks send the deletions of all their posts, and ours are
  a small part of them. A deletion of a post produced before the last restart is not
  forwarded (docs/sources.md);
- a new version (an edit) of a post it produced is forwarded even when it no longer has
  a photo or no longer matches, so that the post's earlier results are retracted;
- everything else is skipped, with a reason the pump counts.

Also here: the class words shared with the X source and `collect` (`tag_words`), the
exponential back-off of the reconnecting clients, and `untrusted`, which keeps a parser
of what a network sends to its contract (any failure is a CodecError) for the live
source and for the replay of its archive alike.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from infra.demo_images import DEMO_CLASSES
from infra.exceptions import CodecError
from producers.source import SourceItem
from schemas.records import MatchingRule, Tweet, photos

#: Posts a source remembers having produced, to forward their deletions and edits.
REMEMBERED_POSTS = 100_000

_WORD = re.compile(r"\w+")


def default_classes() -> list[str]:
    """The classes looked for when none are given: the demo model's, less ``others``
    (which names no animal to look for)."""
    return [c for c in DEMO_CLASSES if c != "others"]


def _plural(word: str) -> str:
    irregular = {"sheep": "sheep", "butterfly": "butterflies", "mouse": "mice"}
    if word in irregular:
        return irregular[word]
    return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def singular(name: str) -> str:
    """A class or tag name in the singular (class folders are named either way: "cats",
    "cow"; "ss" words are singular)."""
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


def tag_words(name: str) -> list[str]:
    """The singular and plural of a class or tag name, in that order, without repeats
    (``cats`` and ``cat`` both give ``["cat", "cats"]``; ``sheep`` gives ``["sheep"]``)."""
    one = singular(name)
    return list(dict.fromkeys([one, _plural(one)]))


_P = ParamSpec("_P")
_R = TypeVar("_R")


def untrusted(parse: Callable[_P, _R]) -> Callable[_P, _R]:
    """A parser of untrusted input that raises only CodecError: any other failure (a type
    the data should not have had, a bug) becomes one, named by its type, so that callers,
    the live source and the replay of its archive, make it a dead letter, not their end."""

    @functools.wraps(parse)
    def parse_or_refuse(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return parse(*args, **kwargs)
        except CodecError:
            raise
        except Exception as e:
            raise CodecError(f"{type(e).__name__}: {e}") from e

    return parse_or_refuse


class TagFilter:
    """Matches posts to classes by hashtag or word; `None` classes match every post."""

    def __init__(self, classes: Sequence[str] | None) -> None:
        if classes is not None:
            classes = [c.strip().lower().lstrip("#") for c in classes]
            if not classes or not all(classes):
                raise ValueError("a tag filter needs at least one non-empty class name")
        self.classes = None if classes is None else list(dict.fromkeys(classes))
        self._words = {c: tag_words(c) for c in self.classes or ()}

    def hashtags(self) -> list[str]:
        """Every hashtag the filter looks for, without '#' (empty without a filter)."""
        return list(dict.fromkeys(w for words in self._words.values() for w in words))

    def match(self, tags: Iterable[str], text: str) -> list[MatchingRule] | None:
        """The rules `tags` (the post's hashtags) or `text` match; None when none does
        (without a filter: ``[]``, every post matches)."""
        if self.classes is None:
            return []
        own = {t.lower().lstrip("#") for t in tags}
        said = {w.lower() for w in _WORD.findall(text)}
        rules: list[MatchingRule] = []
        for name, words in self._words.items():
            hit = next((f"hashtag:{w}" for w in words if w in own), None)
            hit = hit or next((f"word:{w}" for w in words if w in said), None)
            if hit is not None:
                rules.append(MatchingRule(id=hit, tag=name))
        return rules or None


class PostGate:
    """Decides what a network source does with each post it read (module docstring)."""

    def __init__(self, tags: TagFilter, *, remember: int = REMEMBERED_POSTS) -> None:
        self.tags = tags
        self.remember = remember
        self._produced: OrderedDict[str, None] = OrderedDict()

    def item(self, post: Tweet, *, raw: dict[str, Any], position: Any = None) -> SourceItem:
        """The item for `post` (a Tweet record of any operation): the post with its
        matching rules, or the reason it is skipped. `raw` is archived with the rules."""
        post_id = post["id"]
        known = post_id in self._produced
        if post["operation"] == "delete":
            if not known:
                return SourceItem(skipped="delete_unseen", position=position)
            del self._produced[post_id]
            return SourceItem(tweet=post, position=position, raw=raw)
        rules = self.tags.match(post["tags"], post["text"]) if photos(post) else None
        if rules is None:
            if post["operation"] == "update" and known:
                # An edit took away the photos or the matching words: the post's earlier
                # results are retracted downstream, and this version is shed.
                return SourceItem(tweet=post, position=position, raw=raw)
            reason = "no_match" if photos(post) else "no_image"
            return SourceItem(skipped=reason, position=position)
        self._produced[post_id] = None
        self._produced.move_to_end(post_id)
        if len(self._produced) > self.remember:
            self._produced.popitem(last=False)
        kept = Tweet(**(post | {"matching_rules": rules}))  # type: ignore[typeddict-item]
        return SourceItem(tweet=kept, position=position, raw=dict(raw, matching_rules=rules))


class Backoff:
    """Exponential back-off: `first_s`, doubling, at most `max_s`; `reset` after a success."""

    def __init__(self, first_s: float, max_s: float) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError("need 0 < first_s <= max_s")
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def next(self) -> float:
        delay = min(self.first_s * 2**self.failures, self.max_s)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
