"""The `shmwatch` command: etcdctl's verbs against a broker, `serve`, and the tools.

`main` (main.py) dispatches; `args` parses flags as etcdctl does; `txn` reads etcdctl's
txn grammar; `output` prints etcdctl's simple, JSON and table formats."""

from .main import main

__all__ = ["main"]
