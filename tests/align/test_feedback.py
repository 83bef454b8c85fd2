"""Reading feedback through the align consumer group, on a real redis-server."""

from __future__ import annotations

import pytest
import redis

from align import feedback
from align.feedback import FeedbackReader
from align.settings import AlignSettings
from core.keys import Keys

from .conftest import Server


def reader(client: redis.Redis, settings: AlignSettings, **kw: object) -> FeedbackReader:
    return FeedbackReader(client, Keys(settings.redis_prefix), **kw)  # type: ignore[arg-type]


def test_read_joins_completion_and_dedupes_by_id(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    cid = server.completion("What colour is the sky?", "Green.", user="alice", key="k-alice")
    server.feedback(cid, fb_id="fb-1", thumbs="down", key="k-alice")
    server.feedback(cid, fb_id="fb-1", thumbs="down", key="k-alice")  # at-least-once logging wrote it twice
    server.feedback("chatcmpl-gone", fb_id="fb-2", thumbs="up")
    batch = reader(client, settings, missing_completion_wait_s=0).read()  # an orphan: no waiting for it
    assert [f.id for f in batch.feedback] == ["fb-1"]
    assert batch.feedback[0].completion.choices[0].text == "Green."
    assert batch.feedback[0].user == "k-alice"  # the authenticated identity, not the client-set `user`
    assert batch.skipped == {"duplicate": 1, "missing_completion": 1}
    # Every delivered entry is acknowledged with the run, duplicates and orphans included.
    assert len(batch.to_ack[Keys(settings.redis_prefix).feedback]) == 3


def test_feedback_whose_completion_has_not_arrived_stays_pending(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    """Feedback accepted before its completion reached Redis (another replica's writer backlogged, Redis
    down) is kept for a later run, not acknowledged and lost; once the completion arrives it trains."""
    server.feedback("chatcmpl-late", fb_id="fb-late", thumbs="up")
    r = reader(client, settings, missing_completion_wait_s=3600)
    first = r.read()
    assert first.feedback == [] and first.skipped == {"completion_pending": 1}
    assert first.to_ack[Keys(settings.redis_prefix).feedback] == []
    r.ack(first)
    server.completion("Late?", "Here.", cid="chatcmpl-late")
    second = r.read()
    assert [f.id for f in second.feedback] == ["fb-late"]
    # Past the wait it is dropped as an orphan (and acknowledged).
    server.feedback("chatcmpl-never", fb_id="fb-never", thumbs="up")
    late = reader(client, settings, missing_completion_wait_s=3600, clock=lambda: 1e12).read()
    assert late.skipped["missing_completion"] == 1


def test_second_read_after_ack_sees_only_new(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, fb_id="old", thumbs="up")
    r = reader(client, settings)
    first = r.read()
    assert [f.id for f in first.feedback] == ["old"]
    assert r.ack(first) == 1
    assert r.read().feedback == []
    server.feedback(cid, fb_id="new", thumbs="down")
    assert [f.id for f in r.read().feedback] == ["new"]


def test_unacked_read_is_read_again(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, fb_id="a", thumbs="up")
    r = reader(client, settings)
    assert [f.id for f in r.read().feedback] == ["a"]  # a run that failed: no ack
    server.feedback(server.completion("Q2?", "B."), fb_id="b", thumbs="up")
    # A different consumer name (a renamed job) still gets the pending entry, then the new one.
    again = reader(client, settings, consumer="other").read()
    assert [f.id for f in again.feedback] == ["a", "b"]


def test_all_rereads_everything_and_acks_the_unconsumed(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, fb_id="a", thumbs="up")
    r = reader(client, settings)
    r.ack(r.read())
    server.feedback(server.completion("Q2?", "B."), fb_id="b", thumbs="down")
    everything = r.read(all_feedback=True)
    assert [f.id for f in everything.feedback] == ["a", "b"]
    assert len(everything.to_ack[Keys(settings.redis_prefix).feedback]) == 1  # only "b" was new to the group
    r.ack(everything)
    assert r.read().feedback == []


def test_peek_changes_nothing(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    keys = Keys(settings.redis_prefix)
    cid = server.completion("Q?", "A.")
    server.feedback(cid, fb_id="a", thumbs="up")
    r = reader(client, settings)
    assert [f.id for f in r.read(consume=False).feedback] == ["a"]
    assert not client.exists(keys.policy_pairs)  # no group or stream was created
    pending_run = r.read()  # consumes "a" without ack: it is pending
    server.feedback(server.completion("Q2?", "B."), fb_id="b", thumbs="up")
    assert [f.id for f in r.read(consume=False).feedback] == ["a", "b"]
    assert client.xpending(keys.feedback, keys.align_group)["pending"] == 1
    r.ack(pending_run)
    assert [f.id for f in r.read(consume=False).feedback] == ["b"]
    assert [f.id for f in r.read(consume=False, all_feedback=True).feedback] == ["a", "b"]


def test_policy_pairs_are_read_unless_disabled(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    server.policy_pair("Say something rude.", "You fool.", "I'd rather not.", pair_id="pp-1")
    server.policy_pair("Say something rude.", "You fool.", "I'd rather not.", pair_id="pp-1")
    assert [p.id for p in reader(client, settings).read().policy_pairs] == ["pp-1"]
    server.policy_pair("Again.", "Fool.", "No.", pair_id="pp-2")
    assert reader(client, settings, include_policy_pairs=False).read().policy_pairs == []


def test_per_user_cap_keeps_the_newest_and_defers_the_rest(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    """The cap keys on the API key that posted: a new client-set `user` per request does not escape it. It keeps
    each identity's newest entries (the module docstring says why); the older ones wait for later runs."""
    keys = Keys(settings.redis_prefix)
    for i in range(5):
        cid = server.completion(f"Q{i}?", "A.", user=f"sock{i}", key="k-mallory")
        server.feedback(cid, fb_id=f"m{i}", thumbs="down", user=f"sock{i}", key="k-mallory")
    cid = server.completion("Q?", "A.", user="sock0", key="k-alice")
    server.feedback(cid, fb_id="a0", thumbs="up", user="sock0", key="k-alice")
    r = reader(client, settings, max_rows_per_user=2)
    batch = r.read()
    assert [f.id for f in batch.feedback] == ["m3", "m4", "a0"]
    assert batch.skipped["user_cap"] == 3
    r.ack(batch)
    # The capped entries were not acknowledged: the next runs take them (the newest two first).
    assert client.xpending(keys.feedback, keys.align_group)["pending"] == 3
    second = r.read()
    assert [f.id for f in second.feedback] == ["m1", "m2"]
    r.ack(second)
    assert [f.id for f in r.read().feedback] == ["m0"]


def test_a_vote_the_cap_deferred_is_superseded_by_the_same_identitys_later_vote(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    """With the newest kept, an older vote can be pushed out of the window before its replacement arrives: it is
    superseded all the same (consumed with the run), or a later run would train the vote alice took back."""
    keys = Keys(settings.redis_prefix)
    sky = server.completion("What colour is the sky?", "Green.", key="k-alice")
    server.feedback(sky, fb_id="sky-down", thumbs="down", key="k-alice")
    for i in range(2):
        server.feedback(server.completion(f"Q{i}?", "A.", key="k-alice"), fb_id=f"q{i}", thumbs="up", key="k-alice")
    server.feedback(sky, fb_id="sky-up", thumbs="up", key="k-alice")
    r = reader(client, settings, max_rows_per_user=2)
    batch = r.read()
    assert [f.id for f in batch.feedback] == ["q1", "sky-up"]
    assert batch.superseded == [("sky-down", sky)]
    assert batch.skipped == {"superseded": 1, "user_cap": 1}  # q0 waits; sky-down is not counted twice
    r.ack(batch)
    assert [f.id for f in r.read().feedback] == ["q0"]
    assert client.xpending(keys.feedback, keys.align_group)["pending"] == 1


def test_malformed_entries_are_counted(client: redis.Redis, settings: AlignSettings) -> None:
    keys = Keys(settings.redis_prefix)
    client.xadd(keys.feedback, {"schema": "1", "id": "x", "completion_id": "c", "data": "{not json"})
    batch = reader(client, settings).read()
    assert batch.feedback == [] and batch.skipped == {"malformed": 1}


class CountingClient:
    """The real client, noting how many entries each stream read asked for and how many came back."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.reads: list[tuple[str, int, int]] = []  # (command, count asked, entries returned)

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], count: int) -> object:
        reply = self._client.xreadgroup(group, consumer, streams, count=count)
        self.reads.append(("xreadgroup", count, len(reply[0][1]) if reply else 0))  # type: ignore[index]
        return reply

    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> object:
        reply = self._client.xrange(name, min=min, max=max, count=count)
        self.reads.append(("xrange", count or 0, len(reply)))  # type: ignore[arg-type]
        return reply


def test_reads_the_streams_in_bounded_pages_and_stops_at_max_rows(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read never asks Redis for more than a page, and takes at most max_rows entries: the rest stays for the
    next run (so a run's memory follows the rows it trains on, not the length of the streams)."""
    monkeypatch.setattr(feedback, "_PAGE", 7)
    for i in range(50):
        server.feedback(server.completion(f"Q{i}?", "A."), fb_id=f"f{i:02d}", thumbs="up")
    counting = CountingClient(client)
    r = reader(counting, settings, max_rows=20)  # type: ignore[arg-type]
    first = r.read()
    assert [f.id for f in first.feedback] == [f"f{i:02d}" for i in range(20)]
    assert counting.reads and all(0 < asked <= 7 and got <= asked for _, asked, got in counting.reads)
    assert sum(got for _, _, got in counting.reads) == 20  # nothing read past the cap
    r.ack(first)
    # The rest was never delivered: the next runs take it, 20 at a time.
    assert [f.id for f in r.read().feedback] == [f"f{i:02d}" for i in range(20, 40)]
    counting.reads.clear()
    everything = r.read(consume=False, all_feedback=True)
    assert len(everything.feedback) == 20 and all(asked <= 7 for _, asked, _ in counting.reads)


def test_one_vote_per_identity_and_choice_the_latest_wins(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    """Repeating a thumbs-down does not weigh it more, and a changed mind counts once; another identity's vote on the
    same completion (an admin's) and a vote on another choice still count. Superseded ids are consumed with the run."""
    from align.datasets import build_datasets

    cid = server.completion("What colour is the sky?", "Green.", key="k-alice")
    for i in range(3):
        server.feedback(cid, fb_id=f"down{i}", thumbs="down", key="k-alice")
    server.feedback(cid, fb_id="up", thumbs="up", key="k-alice")
    server.feedback(cid, fb_id="admin", thumbs="down", key="k-admin")
    server.feedback(cid, fb_id="other-choice", thumbs="down", key="k-alice", choice_index=1)
    server.feedback(cid, fb_id="remark", comment="a comment alone is not a vote", key="k-alice")
    batch = reader(client, settings, max_rows_per_user=3).read()
    assert [(f.id, f.feedback.thumbs) for f in batch.feedback] == [
        ("up", "up"),
        ("admin", "down"),
        ("other-choice", "down"),
        ("remark", None),
    ]
    assert batch.skipped == {"superseded": 3}
    # Superseding does not count against the cap: alice's two votes and her comment fit max_rows_per_user=3.
    assert "user_cap" not in batch.skipped
    data = build_datasets(batch)
    assert {"down0", "down1", "down2"} <= set(data.feedback_ids)
    assert data.counts["kto_desirable"] == 1
