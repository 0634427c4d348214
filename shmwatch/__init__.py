"""shmwatch: etcd v3's key-value store and watch over shared memory, for one host.

The distribution's own namespace. It holds what both sides of the shared memory agree
on, `shmwatch.wire` (types, ops, errors and the msgpack protocol: the broker and
clientlib both import it, and it imports neither), and `shmwatch.tools` (the `shmwatch`
command, tools/top, tools/stress, tools/bench: installed from the repository's `tools/`
folder under this name so that nothing generic like `tools` lands in site-packages).
What users import is `clientlib` (workers) and `broker` (to embed or run a broker).
Importing this package imports nothing else: it may be imported from any layer.
"""

__version__ = "0.1.0"
