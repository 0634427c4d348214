"""The wire contract: what the broker and its clients say to each other.

`types` (etcd's KeyValue, Event and responses), `ops` (txn compares and request ops),
`errors` (typed errors with wire codes and etcd's texts) and `protocol` (every message
as an encode/decode pair over msgpack, no I/O). Both sides import this package; it
imports neither of them (tests/test_layers.py checks it), and nothing but msgpack.
"""
