"""The node image: when to pull, what /ready says while it is missing, and how the engine's 404s map."""

from __future__ import annotations

import docker.errors
import pytest

from nodeops.images import missing_note, should_pull
from shared.engines.docker.client import docker_errors
from shared.errors import ContainerGone, ImageMissing


@pytest.mark.parametrize(("policy", "present", "pulling", "pull"), [
    ("missing", False, False, True),
    ("missing", True, False, False),  # there: nothing to fetch
    ("missing", False, True, False),  # one pull at a time
    ("never", False, False, False),
    ("never", True, False, False),
])
def test_only_a_missing_image_is_pulled_and_only_when_allowed(policy: str, present: bool, pulling: bool,
                                                              pull: bool) -> None:
    assert should_pull(policy, present, pulling) is pull


def test_the_note_says_what_is_being_done() -> None:
    assert missing_note("missing", True, "") == "pulling it from its registry"
    assert "node.image_pull is never" in missing_note("never", False, "")
    assert "pull failed: no such host" in missing_note("missing", False, "no such host")


def test_a_missing_image_is_not_a_gone_container() -> None:
    with pytest.raises(ImageMissing) as info, docker_errors():
        raise docker.errors.ImageNotFound("404", explanation="No such image: toolserver-node:nope")
    assert info.value.status_code == 503
    assert info.value.detail == "node image toolserver-node:nope is not on the engine"
    with pytest.raises(ContainerGone), docker_errors():
        raise docker.errors.NotFound("404", explanation="No such container: abc")
