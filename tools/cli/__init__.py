"""The `shmwatch` command: etcdctl's verbs against a broker, `serve`, and the tools.

`main` (main.py) dispatches; `args` parses flags as etcdctl does; `txn` reads etcdctl's
txn grammar; `output` prints etcdctl's simple, JSON and table formats; `lease` is
etcdctl's lease commands; `status` etcdctl's endpoint status for a broker."""

from .main import main

__all__ = ["main"]
