"""What every client command of the CLI shares: the global flags, the output formats,
which broker a command talks to, and the cluster id its JSON headers carry."""

from __future__ import annotations

import os

from shm import layout as L
from shm.segment import shm_name

from .args import EXIT_BAD_FEATURE, EXIT_ERROR, CliError, Flag

GLOBAL_FLAGS = [
    Flag("name", str, "", "broker name (default: $SHMWATCH_NAME or 'default')"),
    Flag("write-out", str, "simple", "output format: simple, json, or table (get, status)", "w"),
    Flag("hex", bool, False, "print keys and values as \\xHH escapes"),
    Flag("timeout", float, 5.0, "seconds a request may take"),
]

OUTPUT_FORMATS = ("simple", "json", "table", "fields", "protobuf")  # what etcdctl's -w knows


def check_format(fmt: str, formats: tuple[str, ...]) -> None:
    """etcdctl's refusals of `-w FMT`: unknown to etcdctl, or not offered here."""
    if fmt not in OUTPUT_FORMATS:
        raise CliError(EXIT_BAD_FEATURE, "unsupported output format")
    if fmt not in formats:
        raise CliError(EXIT_BAD_FEATURE, f"{fmt} not supported as output format")


def broker_name(values: dict) -> str:
    """The broker a command talks to: --name, else $SHMWATCH_NAME, else 'default';
    a name no segment can carry is refused before connecting (one error line)."""
    name = values["name"] or os.environ.get("SHMWATCH_NAME") or "default"
    try:
        shm_name(name, "ctl")
    except ValueError as exc:
        raise CliError(EXIT_ERROR, str(exc)) from None
    return name


def cluster_id(c) -> int:
    """The broker's cluster id (its JSON headers' cluster_id), 0 before attaching."""
    return c._words[L.CTL_CLUSTER_ID] if c._words is not None else 0
