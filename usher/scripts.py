"""Lua script calls sent together: one pipeline of EVALSHAs, and those whose script Redis no
longer has (a restart emptied its script cache) loaded and sent once more."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["ScriptCall", "run_script_calls"]


@dataclass(frozen=True, slots=True)
class ScriptCall:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]


async def run_script_calls(client: aioredis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """The calls' replies in order, an error in place of a call that failed. A lone call
    goes as one command (its script reloads itself), not a pipeline."""
    if len(calls) == 1:
        call = calls[0]
        try:
            return [await call.script(keys=call.keys, args=call.args, client=client)]
        except ResponseError as error:  # this call's own failure, as in a pipeline
            return [error]
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in (1, 2):
        async with client.pipeline(transaction=False) as pipe:
            for i in todo:
                call = calls[i]
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            got = await pipe.execute(raise_on_error=False)
        for i, reply in zip(todo, got, strict=True):
            replies[i] = reply
        todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
        if not todo or attempt == 2:
            break
        for script in {id(calls[i].script): calls[i].script for i in todo}.values():
            await client.script_load(script.script)
    return replies
