"""The node image on this replica's engine: checked at start and while missing, pulled when the
policy allows; /ready and get_cookie name it while it is absent."""

from __future__ import annotations

import asyncio
import logging

from nodeops.context import NodeOps
from shared.errors import EngineError, EngineUnavailable, ImageMissing

log = logging.getLogger(__name__)


def should_pull(policy: str, present: bool, pulling: bool) -> bool:
    """Whether to start a pull: only of a missing image, only under "missing", one at a time."""
    return policy == "missing" and not present and not pulling


def missing_note(policy: str, pulling: bool, pull_error: str) -> str:
    """What /ready adds to "node image X is not on the engine": what is being done about it."""
    if pulling:
        return "pulling it from its registry"
    if policy == "never":
        return "node.image_pull is never: load it onto the engine (docker load, docker pull, docker tag)"
    if pull_error:
        return f"pull failed: {pull_error}; load it onto the engine or make its registry reachable"
    return "not pulled yet"


async def check_once(ops: NodeOps) -> bool:
    """Whether the image is there; starts a pull when it is not and the policy allows."""
    present = await ops.backend.image_present()
    if should_pull(ops.cfg.node.image_pull, present, ops.image.pulling):
        ops.image.pulling = True
        try:
            await ops.backend.pull_image()
            ops.image.pull_error = ""
            present = await ops.backend.image_present()
        except (EngineError, EngineUnavailable, ImageMissing) as exc:
            ops.image.pull_error = exc.detail
            log.warning("image_pull_failed image=%s error=%r", ops.backend.image, exc.detail)
        finally:
            ops.image.pulling = False
    if not present:
        log.warning("image_missing image=%s note=%r", ops.backend.image,
                    missing_note(ops.cfg.node.image_pull, False, ops.image.pull_error))
    return present


async def keep_present(ops: NodeOps) -> None:
    """Background task: check (and pull) at start, then every node.image_check_seconds, so an image
    removed later is pulled again too."""
    while True:
        try:
            await check_once(ops)
        except EngineUnavailable as exc:  # /ready says so too; try again later
            log.warning("image_check_deferred reason=%s", exc.detail)
        await asyncio.sleep(ops.cfg.node.image_check_seconds)


async def problem(ops: NodeOps) -> ImageMissing | None:
    """ImageMissing naming the image and what is done about it, or None when the engine has it."""
    if await ops.backend.image_present():
        return None
    return ImageMissing(ops.backend.image, missing_note(ops.cfg.node.image_pull, ops.image.pulling,
                                                        ops.image.pull_error))
