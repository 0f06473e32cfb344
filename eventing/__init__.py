"""The eventing platform: event store, outbox, relay and consumer runtime.

It knows no business app: apps declare their events (`events.py`) and their
handlers (`handlers.py`), and this package moves them.
"""
