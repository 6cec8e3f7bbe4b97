"""A space is validated once and then read through typed, read-only sections."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from clipq_search.errors import ConfigError
from clipq_search.search.space import SCHEMA, Space, load_space
from clipq_search.search.study import SearchRequest


def test_sections_mirror_the_file_and_cannot_be_changed() -> None:
    space = load_space("smoke", ["trial.train.lr=0.02", "layers.dense=[fc3]", "search.paper.lambdas=[1, 3]"])
    assert space.trial.train.lr == 0.02 and space.trial.train.given()["lr"] == 0.02
    assert "momentum" not in space.trial.train.given()  # null: the default applies
    assert space.layers.dense == ("fc3",) and space.search.paper.lambdas == (1, 3)
    plain = space.to_dict()
    for section in ("dataset", "baseline", "trial", "final", "search", "resources"):
        typed = dataclasses.asdict(getattr(space, section))
        assert set(typed) == set(SCHEMA[section]), section  # every key of the schema, no other
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.search.trials = 5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="read-only"):
        space.search = space.search  # type: ignore[misc]
    plain["search"]["trials"] = 99  # a copy: the space keeps its own
    assert space.search.trials != 99 and space.to_dict()["search"]["trials"] != 99


def test_with_search_makes_a_new_space_and_checks_the_values() -> None:
    space = load_space("smoke")
    wider = space.with_search(trials=9, concurrency=3, seed=7)
    assert (wider.search.trials, wider.search.concurrency, wider.search.seed) == (9, 3, 7)
    assert space.search.trials != 9 and "trials: 9" in wider.to_yaml() and "trials: 9" not in space.to_yaml()
    assert wider.fingerprint("layers", "trial") == space.fingerprint("layers", "trial")
    with pytest.raises(ConfigError, match=r"seed=-1 is invalid; give an integer in \[0, 4294967295\]"):
        space.with_search(seed=-1)
    with pytest.raises(ConfigError, match="trials=0 is invalid"):
        space.with_search(trials=0)


def test_a_space_travels_to_workers_as_it_is() -> None:
    space = load_space("smoke", ["layers.groups={g: [fc1, fc2]}"]).with_search(trials=5)
    again = pickle.loads(pickle.dumps(space))
    assert isinstance(again, Space) and again.search.trials == 5 and again.to_yaml() == space.to_yaml()
    assert [u.key for u in again.search_params(["fc1", "fc2", "fc3"])] == ["g", "fc3"]


def test_a_search_request_takes_only_the_options_it_names() -> None:
    request = dataclasses.replace(SearchRequest(), trials=4, sampler="tpe")
    assert request.search_changes() == {"trials": 4, "sampler": "tpe"}
    with pytest.raises(TypeError):
        dataclasses.replace(SearchRequest(), trails=4)
