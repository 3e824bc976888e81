"""Rendered stems kept while their upload fails (tasks.jobstore.staging), against the real Redis."""


def test_a_kept_render_is_bounded_in_size_and_age(store):
    assert store.stage_rendered("j1", "bass", b"RIFF" * 10, {"upload": {}}, max_bytes=40,
                                ttl_seconds=30)
    data, details = store.staged_rendered("j1", "bass")
    assert data == b"RIFF" * 10 and details == {"upload": {}}
    assert 0 < store._redis.ttl("stemgen:staged:j1:bass") <= 30
    assert not store.stage_rendered("j1", "drums", b"x" * 41, {}, max_bytes=40, ttl_seconds=30)
    assert not store.stage_rendered("j1", "guitar", b"x", {}, max_bytes=40, ttl_seconds=0)
    assert store.staged_rendered("j1", "drums") is None
    store.drop_staged("j1", "bass")
    assert store.staged_rendered("j1", "bass") is None
