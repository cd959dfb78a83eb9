"""Scaling the Kafka-triggered wrapper on the real local broker and S3 server.

Two ``nec-serve wrapper --trigger kafka`` processes in one consumer group share a topic's
partitions and both do work; one is SIGKILLed while its partitions still hold queued
messages, the other takes them over from their committed offsets, and every message sent
ends up with its output object in S3 (at-least-once: duplicates allowed, losses not).

Who owns and who processed what is read from the broker, not from the wrappers' status
events: the group's description (members named by their client id, ``nec-wrapper-$HOSTNAME``)
and its committed offsets, which the wrapper moves only once a message is done with.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from nec_dev.workflow_demo import workflow_message, wrapper_args
from nec_serve.config_store import LocalConfigStore
from nec_serve.messages import parse_workflow

PARTITIONS = 4
WARMUP = 1  # messages per partition sent while both wrappers run
BACKLOG = 10  # messages per partition sent just before one wrapper is killed
SESSION_S = 6  # --session-timeout: how long the group waits for a killed member
PODS = ("pod-a", "pod-b")


def _client(pod: str) -> str:
    return f"nec-wrapper-{pod}"


class Group:
    """The consumer group as the broker sees it: members, assignment, committed offsets."""

    def __init__(self, admin, group: str, topic: str):
        self.admin, self.group, self.topic = admin, group, topic

    def members(self) -> tuple[str, dict[str, set[int]]]:
        """The group's state and each member's (by client id) assigned partitions."""
        desc = self.admin.describe_groups([self.group])[self.group]
        owned: dict[str, set[int]] = {}
        for m in desc["members"]:
            parts = owned.setdefault(m["client_id"], set())
            for a in (m.get("member_assignment") or {}).get("assigned_partitions", []):
                if a["topic"] == self.topic:
                    parts.update(a["partitions"])
        return desc["group_state"], owned

    def committed(self) -> dict[int, int]:
        """Committed offset per partition (0 where nothing was committed yet)."""
        got = self.admin.list_group_offsets({self.group: None}).get(self.group, {})
        out = dict.fromkeys(range(PARTITIONS), 0)
        for tp, om in got.items():
            if tp.topic == self.topic and om.offset >= 0:
                out[tp.partition] = om.offset
        return out

    def wait_members(self, expect: set[str], timeout: float, procs) -> dict[str, set[int]]:
        """Wait until the group is stable with exactly ``expect`` members, each assigned."""
        from kafka.errors import KafkaError

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            _alive(procs)
            try:
                state, owned = last = self.members()
            except KafkaError as err:  # e.g. no group coordinator yet on a fresh broker
                last = err
            else:
                if state == "Stable" and set(owned) == expect and all(owned.values()):
                    return owned
            time.sleep(0.2)
        raise AssertionError(f"group never became stable with members {expect}: {last}")

    def wait_committed(self, want, timeout: float, procs) -> dict[int, int]:
        """Wait until ``want(committed offsets)`` holds; returns the offsets."""
        from kafka.errors import KafkaError

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            _alive(procs)
            try:
                last = self.committed()
            except KafkaError as err:
                last = err
            else:
                if want(last):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"committed offsets stuck at {last}")


def _alive(procs) -> None:
    for pod, (proc, log) in procs.items():
        if proc.poll() is not None:
            raise AssertionError(
                f"wrapper {pod} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )


def _npy(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("text", ["5.9", "301", "0", "-6", "nan", "soon"])
def test_session_timeout_flag_is_bounded(text):
    from nec_wrapper.triggers import SESSION_TIMEOUT_BOUNDS_S, run_consumer, session_timeout

    assert [session_timeout(str(b)) for b in SESSION_TIMEOUT_BOUNDS_S] == [6.0, 300.0]
    with pytest.raises(argparse.ArgumentTypeError):
        session_timeout(text)
    with pytest.raises(ValueError, match="not within 6..300 s"):
        run_consumer(None, "127.0.0.1:9", "g", list, None, session_timeout_s=5.0)


def test_two_wrappers_share_partitions_and_survivor_takes_over_after_kill(
    kafka, s3, producer, tiny_export, tmp_path
):
    from kafka import KafkaAdminClient

    u = uuid.uuid4().hex[:8]
    topic_in, topic_out, bucket, group_id = f"scale{u}.in", f"scale{u}.out", f"scale-{u}", f"g-{u}"
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    admin.create_topics(
        {topic_in: {"num_partitions": PARTITIONS, "replication_factor": 1}},
        wait_for_metadata=True,
    )
    group = Group(admin, group_id, topic_in)

    client = s3.client()
    client.create_bucket(Bucket=bucket)
    names = [f"m{i:03d}" for i in range(PARTITIONS * (WARMUP + BACKLOG))]
    for i, name in enumerate(names):
        client.put_object(Bucket=bucket, Key=f"input/{name}.npy", Body=_npy(i))
    store = LocalConfigStore(tmp_path / "store")
    store.put(
        parse_workflow(
            workflow_message(
                "published",
                "nec-compress",
                topic_in,
                topic_out,
                s3,
                bucket=bucket,
                workflow=f"scale-{u}",
            )
        )
    )

    def send(first: int, last: int) -> None:
        """Messages ``first..last-1``, message i to partition i mod PARTITIONS, acknowledged."""
        for i in range(first, last):
            step = {
                "previous_component_end": True,
                "S3_bucket_desc": {"folder": "input", "filename": f"{names[i]}.npy"},
                "meta_information": {},
            }
            producer.send(topic_in, value=step, partition=i % PARTITIONS).get(10)

    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    t0 = time.monotonic()
    try:
        for pod in PODS:
            work, log = tmp_path / f"work-{pod}", tmp_path / f"{pod}.log"
            work.mkdir()
            args = wrapper_args(
                "compress",
                tiny_export,
                kafka.bootstrap_servers,
                store.root,
                work,
                trigger="kafka",
                bands="1,2,3",
                group=group_id,
                metrics_port=0,  # two wrappers on one host: no metrics endpoint to share a port
            )
            args += ["--status-topic", f"status{u}", "--dead-letter-topic", f"dlq{u}"]
            args += ["--session-timeout", str(SESSION_S)]
            cmd = [sys.executable, "-m", "nec_cli", *args]
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HOSTNAME": pod}
                )
            procs[pod] = (proc, log)

        # 1. Both wrappers join the group and split the partitions between them.
        owned = group.wait_members({_client(p) for p in PODS}, 90, procs)
        assert sorted(p for parts in owned.values() for p in parts) == list(range(PARTITIONS))
        t_joined = time.monotonic()

        # 2. Both do work: one message per partition, each committed by its partition's owner.
        send(0, PARTITIONS * WARMUP)
        group.wait_committed(lambda c: all(n >= WARMUP for n in c.values()), 60, procs)
        assert group.members() == ("Stable", owned), "the group rebalanced during the warm-up"
        for name in names[: PARTITIONS * WARMUP]:
            client.head_object(Bucket=bucket, Key=f"result-nec-compress/{name}.necb")

        # 3. A backlog for every partition; kill pod-b once it is working through its own.
        victim, survivor = PODS[1], PODS[0]
        theirs = owned[_client(victim)]
        send(PARTITIONS * WARMUP, len(names))
        before = group.committed()
        group.wait_committed(lambda c: any(c[p] > before[p] for p in theirs), 60, procs)
        procs[victim][0].send_signal(signal.SIGKILL)
        procs[victim][0].wait(10)
        t_kill = time.monotonic()
        end = dict.fromkeys(range(PARTITIONS), WARMUP + BACKLOG)
        at_kill = group.committed()
        queued = sum(end[p] - at_kill[p] for p in theirs)
        assert queued >= 2, f"{victim} finished its partitions before the kill: {at_kill}"

        # 4. The survivor takes over the killed wrapper's partitions ...
        alive = {survivor: procs[survivor]}
        after = group.wait_members({_client(survivor)}, SESSION_S + 30, alive)
        handover_s = time.monotonic() - t_kill
        assert after[_client(survivor)] == set(range(PARTITIONS))
        assert handover_s < SESSION_S + 15, f"handover took {handover_s:.1f} s"

        # 5. ... and works through their backlog: every message done, none lost.
        final = group.wait_committed(lambda c: c == end, 90, alive)
        assert all(final[p] > at_kill[p] for p in theirs)  # committed by the survivor
        keys = set()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="result-nec-compress/"
        ):
            keys.update(o["Key"] for o in page.get("Contents", []))
        missing = [n for n in names if f"result-nec-compress/{n}.necb" not in keys]
        assert not missing, f"lost messages: {missing}"
        total_s = time.monotonic() - t0
        print(
            f"joined after {t_joined - t0:.1f} s, handover {handover_s:.1f} s "
            f"({queued} queued for {victim}), all done after {total_s:.1f} s"
        )

        # 6. Stopped with SIGTERM, a wrapper leaves the group at once (no session to wait out).
        proc, _ = procs[survivor]
        proc.terminate()
        assert proc.wait(30) == 0
        assert group.members() == ("Empty", {})
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        admin.close()
