"""Producers of tagstream: tweet sources, demo traffic and the demo image host."""
