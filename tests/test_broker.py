"""The embedded broker never shows a consumer a half-written message."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from worker.broker import Channel
from worker.celery_app import make_celery
from worker.settings import Settings


def test_messages_appear_complete_while_a_consumer_lists_the_folder(tmp_path: Path) -> None:
    settings = Settings(archive_dir=tmp_path / "var" / "archive")
    app = make_celery(settings)
    queue = settings.broker_folder / "queue"
    assert app.conf.broker_url.startswith("carebridge-filesystem://")
    seen_partial: list[str] = []
    stop = threading.Event()

    def consumer() -> None:  # what kombu's _get does: list, then read
        while not stop.is_set():
            for name in os.listdir(queue):
                if name.endswith(".cpu.msg"):
                    try:
                        data = (queue / name).read_bytes()
                    except FileNotFoundError:
                        continue
                    if not data.endswith(b"}"):
                        seen_partial.append(name)

    thread = threading.Thread(target=consumer)
    thread.start()
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            assert isinstance(channel, Channel)
            payload = {"body": "x" * 200_000, "headers": {}}
            for _ in range(50):
                channel._put("cpu", payload)
    finally:
        stop.set()
        thread.join()
    assert seen_partial == []
    assert len([n for n in os.listdir(queue) if n.endswith(".cpu.msg")]) == 50
    assert not [n for n in os.listdir(queue) if n.endswith(".tmp")]
