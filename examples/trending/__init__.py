"""Trending hashtags: a Faust service on tagstream's `hashtags` topic (see app.py)."""
