#!/usr/bin/env python3
"""Tiny Kafka CLI for Backstop's integration tests (uses confluent-kafka).

  kafka_tool.py consume      --brokers B --topic T [--timeout S] [--group G] [--max N]
  kafka_tool.py create-topic --brokers B --topic T [--partitions N]
  kafka_tool.py committed    --brokers B --group G --topic T
  kafka_tool.py list-topics  --brokers B [--timeout S]

consume prints one JSON object per message:
  {"key", "value", "headers": {k: v}, "partition", "offset"}
(key/value/header values decoded as UTF-8, invalid bytes replaced; null stays null)
and exits once no new message has arrived for --timeout seconds (or after --max).
Without --group it reads every partition from the beginning and commits nothing
(no group join, so it is fast); with --group it joins that consumer group, starts
at the group's committed offset (earliest if none) and commits each message.
"""
import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def text(b):
    return None if b is None else b.decode("utf-8", errors="replace")


def consume(args):
    conf = {
        "bootstrap.servers": args.brokers,
        "group.id": args.group or f"kafka-tool-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        # Tansu delays a group join by ~session.timeout.ms/2; 2 s keeps the join near 1 s.
        "session.timeout.ms": 2000,
        "heartbeat.interval.ms": 500,
        "max.poll.interval.ms": 10000,
    }
    c = Consumer(conf)
    assigned = []
    if args.group:
        c.subscribe([args.topic], on_assign=lambda _c, parts: assigned.append(time.monotonic()))
    else:
        md = c.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if md is None or md.error is not None:
            sys.exit(f"kafka_tool: topic {args.topic!r} not found: {md and md.error}")
        c.assign([TopicPartition(args.topic, p, 0) for p in md.partitions])
        assigned.append(time.monotonic())

    # The idle timer restarts on partition assignment and on every message.
    # A group join never completing is bounded by max(timeout, 30 s).
    start = time.monotonic()
    last = start
    seen = 0
    try:
        while True:
            now = time.monotonic()
            if assigned and now - max(last, assigned[-1]) >= args.timeout:
                break
            if not assigned and now - start >= max(args.timeout, 30):
                sys.exit(f"kafka_tool: no partitions assigned in group {args.group!r}")
            msg = c.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            print(json.dumps({
                "key": text(msg.key()),
                "value": text(msg.value()),
                "headers": {k: text(v) for k, v in (msg.headers() or [])},
                "partition": msg.partition(),
                "offset": msg.offset(),
            }), flush=True)
            if args.group:
                c.commit(message=msg, asynchronous=False)
            last = time.monotonic()
            seen += 1
            if args.max and seen >= args.max:
                break
    finally:
        c.close()


def create_topic(args):
    admin = AdminClient({"bootstrap.servers": args.brokers})
    fut = admin.create_topics([NewTopic(args.topic, num_partitions=args.partitions,
                                        replication_factor=1)])[args.topic]
    try:
        fut.result(timeout=15)
        print(f"created {args.topic} ({args.partitions} partitions)")
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        print(f"{args.topic} already exists")


def committed(args):
    """Prints {partition: next offset} committed by a consumer group."""
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group, "enable.auto.commit": False})
    try:
        md = c.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if md is None or md.error is not None:
            sys.exit(f"kafka_tool: topic {args.topic!r} not found")
        parts = c.committed([TopicPartition(args.topic, p) for p in md.partitions], timeout=10)
        print(json.dumps({str(tp.partition): tp.offset for tp in parts}))
    finally:
        c.close()


def list_topics(args):
    md = AdminClient({"bootstrap.servers": args.brokers}).list_topics(timeout=args.timeout)
    print(json.dumps({t: len(m.partitions) for t, m in sorted(md.topics.items())}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--timeout", type=float, default=5.0, help="idle seconds before exiting")
    c.add_argument("--group")
    c.add_argument("--max", type=int, default=0, help="exit after this many messages")
    c.set_defaults(func=consume)
    t = sub.add_parser("create-topic")
    t.add_argument("--brokers", required=True)
    t.add_argument("--topic", required=True)
    t.add_argument("--partitions", type=int, default=1)
    t.set_defaults(func=create_topic)
    o = sub.add_parser("committed", help="prints {partition: committed offset} of a group (negative = none)")
    o.add_argument("--brokers", required=True)
    o.add_argument("--group", required=True)
    o.add_argument("--topic", required=True)
    o.set_defaults(func=committed)
    l = sub.add_parser("list-topics", help="prints {topic: partitions}; fails if broker unreachable")
    l.add_argument("--brokers", required=True)
    l.add_argument("--timeout", type=float, default=5.0)
    l.set_defaults(func=list_topics)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
