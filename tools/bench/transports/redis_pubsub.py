"""Redis pub/sub as a transport: writers PUBLISH msgpack [key, value, seq] on one channel
per trial (a pipeline of 64 for the batched and pipelined paths), readers SUBSCRIBE with
redis-py, through the run's loopback redis-server (servers.RedisServer).
"""

from __future__ import annotations

import time

import msgpack

from ..servers import HOST, RedisServer
from .base import Transport, packb

SUBSCRIBE_S = 30.0
DRAIN_MAX = 1024  # messages one recv() takes


class RedisWriter:
    def __init__(self, env, trial, idx):
        import redis  # optional (the bench extra): only imported once chosen

        self.r = redis.Redis(host=HOST, port=env["port"])
        self.ch = env["channel"]
        self.r.ping()

    def send(self, key, value, seq):
        self.r.publish(self.ch, packb(key, value, seq))

    def send_batch(self, items):
        p = self.r.pipeline(transaction=False)
        ch = self.ch
        for k, v, s in items:
            p.publish(ch, packb(k, v, s))
        p.execute()

    send_many = send_batch  # a pipeline of 64 PUBLISH is both

    def close(self):
        self.r.close()


class RedisReader:
    def __init__(self, env, trial, idx):
        import redis

        self.r = redis.Redis(host=HOST, port=env["port"])
        self.p = self.r.pubsub()
        self.p.subscribe(env["channel"])
        deadline = time.monotonic() + SUBSCRIBE_S
        while True:  # wait for the subscription's confirmation
            m = self.p.get_message(timeout=1.0)
            if m and m["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("redis: no subscribe confirmation")

    def recv(self, timeout):
        get = self.p.get_message
        m = get(ignore_subscribe_messages=True, timeout=timeout)
        if m is None:
            return []
        unpackb = msgpack.unpackb
        out = [unpackb(m["data"])[1]]
        for _ in range(DRAIN_MAX - 1):
            m = get(ignore_subscribe_messages=True, timeout=0.0)
            if m is None:
                break
            out.append(unpackb(m["data"])[1])
        return out

    def close(self):
        self.p.close()
        self.r.close()


class RedisT(Transport):
    name = "redis"
    label = "Redis pub/sub (redis-py)"
    write_paths = ("sync", "batched", "pipelined")
    writer = RedisWriter
    reader = RedisReader

    def __init__(self):
        self.server = RedisServer()

    missing = staticmethod(RedisServer.missing)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()

    def server_pid(self, env):
        return self.server.pid

    def prepare(self, trial):
        return {"port": self.server.port, "channel": b"bench." + trial.prefix}
