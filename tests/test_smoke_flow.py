"""The core path end to end: submit, background on a real worker, flag, waiting page."""

from tests.fixture_actions import read_calls
from tests.helpers import record_of, runs_of, submit, token_of, work


def test_submit_runs_sync_part_and_background_sets_flag(client, rt):
    response = submit(client, "demo", {"name": "Ann", "email": "ann@example.com",
                                       "count": "12"})
    token = token_of(response)
    record = record_of(rt, token)
    assert record.data["status"] == "received" and record.data["size"] == "big"
    assert record.data["ready"] is False
    page = client.get(f"/r/{token}")
    assert b'<meta http-equiv="refresh" content="2">' in page.data
    assert client.get(f"/r/{token}/status").json["done"] is False

    work(rt)

    status = client.get(f"/r/{token}/status").json
    assert status["done"] is True
    assert status["record"]["ready"] is True and status["record"]["status"] == "prepared"
    assert status["runs"][0]["progress"] == 100 and status["runs"][0]["status"] == "done"
    page = client.get(f"/r/{token}")
    assert b"http-equiv=\"refresh\"" not in page.data
    assert b"All set, Ann (big)." in page.data
    assert [c.split()[0] for c in read_calls(rt.settings.instance_dir)] == ["first", "second"]
    assert runs_of(rt, token)[0].attempt == 1
