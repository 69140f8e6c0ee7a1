"""Experiments built on the hiermem library (as Meta Lingua's apps/ are built on lingua/).

The library (`hiermem`) never imports this package; only the `hiermem demo` and `hiermem corpus` commands load
it, lazily. `longtail/` is the long-tail knowledge demo (docs/method.md §7.7 at CPU scale, set up after the
prototype of §9).
"""
