import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.domain.model_store import METADATA_FILE, ModelStore
from service.errors import FailedPrecondition, InvalidRequest, NotFound


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


def publish(store, name, job_id, marker=""):
    staging = store.staging_dir(name, job_id)
    (staging / METADATA_FILE).write_text(f'{{"job_id": "{job_id}", "marker": "{marker}"}}')
    return store.publish(name, job_id, staging)


def test_publishing_gives_consecutive_versions(store):
    assert publish(store, "m", "job-1", "first") == 1
    assert publish(store, "m", "job-2", "second") == 2

    assert store.versions("m") == [1, 2]
    assert store.models() == ["m"]
    assert store.metadata("m", 1)["marker"] == "first"
    assert store.metadata("m", 2)["marker"] == "second"
    assert store.published_version("m", "job-2") == 2
    assert store.published_version("m", "job-3") is None


def test_publishing_twice_for_one_job_returns_the_same_version(store):
    first = publish(store, "m", "job-1", "first")
    again = publish(store, "m", "job-1", "retry")

    assert again == first == 1
    assert store.versions("m") == [1]
    assert store.metadata("m", 1)["marker"] == "first"
    assert not (store.root / "m" / ".staging" / "job-1").exists()


def test_versions_are_per_model(store):
    publish(store, "a", "j1")

    assert publish(store, "b", "j2") == 1
    assert store.models() == ["a", "b"]


def test_resolve_an_exact_version(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")

    assert store.resolve("m", version=1) == 1


def test_resolve_defaults_to_latest_without_a_stable_alias(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")

    assert store.resolve("m") == 2


def test_resolve_defaults_to_the_stable_alias(store):
    for job in ("j1", "j2", "j3"):
        publish(store, "m", job)
    store.set_alias("m", "stable", 2)

    assert store.resolve("m") == 2
    assert store.resolve("m", alias="stable") == 2


def test_resolve_an_alias(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")
    store.set_alias("m", "canary", 1)

    assert store.resolve("m", alias="canary") == 1


def test_resolve_an_unknown_model(store):
    with pytest.raises(NotFound, match="model 'ghost' not found; train it first"):
        store.resolve("ghost")


def test_resolve_an_unknown_version_lists_the_known_ones(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")

    with pytest.raises(NotFound, match=r"model 'm' has no version 7; it has versions 1\.\.2"):
        store.resolve("m", version=7)


def test_resolve_an_unknown_alias_lists_the_known_ones(store):
    publish(store, "m", "j1")

    with pytest.raises(NotFound, match="has no alias 'prod'; its aliases: none"):
        store.resolve("m", alias="prod")

    store.set_alias("m", "canary", 1)
    with pytest.raises(NotFound, match="its aliases: canary"):
        store.resolve("m", alias="prod")


def test_set_alias_returns_the_previous_version(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")

    assert store.set_alias("m", "stable", 1) == 0
    assert store.set_alias("m", "stable", 2) == 1
    assert store.aliases("m") == {"stable": 2}


def test_set_alias_to_an_unknown_version_is_not_found(store):
    publish(store, "m", "j1")

    with pytest.raises(NotFound, match="no version 5"):
        store.set_alias("m", "stable", 5)
    assert store.aliases("m") == {}


def test_set_alias_checks_the_alias(store):
    publish(store, "m", "j1")

    with pytest.raises(InvalidRequest, match="reserved"):
        store.set_alias("m", "latest", 1)


def test_delete_alias(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")
    store.set_alias("m", "stable", 1)

    store.delete_alias("m", "stable")

    assert store.aliases("m") == {}
    assert store.resolve("m") == 2
    with pytest.raises(NotFound, match="no alias 'stable'"):
        store.delete_alias("m", "stable")


def test_delete_version_refuses_an_aliased_version(store):
    publish(store, "m", "j1")
    store.set_alias("m", "stable", 1)
    store.set_alias("m", "canary", 1)

    with pytest.raises(FailedPrecondition, match="aliased as canary, stable"):
        store.delete_version("m", 1)
    assert store.versions("m") == [1]


def test_delete_version_removes_it(store):
    publish(store, "m", "j1")
    publish(store, "m", "j2")

    store.delete_version("m", 1)

    assert store.versions("m") == [2]
    assert not store.path("m", 1).exists()
    assert not any(p.name.startswith(".deleting") for p in (store.root / "m").iterdir())
    with pytest.raises(NotFound, match="no version 1"):
        store.delete_version("m", 1)


def test_a_model_without_versions_is_not_listed(store):
    publish(store, "m", "j1")
    store.delete_version("m", 1)

    assert store.models() == []


@pytest.mark.parametrize("name", ["..", "../evil", "a/b", "a..b", "/abs"])
def test_names_that_could_escape_the_store_are_refused(store, tmp_path, name):
    with pytest.raises(InvalidRequest) as info:
        store.staging_dir(name, "j1")
    assert info.value.field == "model_name"

    for call in (lambda: store.resolve(name), lambda: store.versions(name)):
        with pytest.raises(InvalidRequest):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_concurrent_publishes_get_distinct_versions(store):
    staged = [store.staging_dir("m", f"job-{i}") for i in range(8)]
    start = threading.Barrier(8)

    def run(i):
        start.wait()
        return store.publish("m", f"job-{i}", staged[i])

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(run, range(8)))

    assert sorted(versions) == list(range(1, 9))
    assert store.versions("m") == list(range(1, 9))
    assert [store.published_version("m", f"job-{i}") for i in range(8)] == versions
    assert not any((store.root / "m" / ".staging").iterdir())


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_alias("ghost", "stable", 1),
        lambda s: s.delete_alias("ghost", "stable"),
        lambda s: s.delete_version("ghost", 1),
        lambda s: s.update_metadata("ghost", 1, evaluations={}),
    ],
    ids=["set_alias", "delete_alias", "delete_version", "update_metadata"],
)
def test_calls_about_a_model_that_does_not_exist_create_nothing(store, call):
    with pytest.raises(NotFound, match="model 'ghost' not found"):
        call(store)

    assert not (store.root / "ghost").exists()
