"""Script calls sent together (usher/scripts.py), on a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from usher.scripts import ScriptCall, run_script_calls


async def test_calls_after_a_script_cache_flush_are_loaded_and_sent_again(
    redis_client: aioredis.Redis,
) -> None:
    incr = redis_client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    fail = redis_client.register_script("return redis.error_reply('no')")
    calls = [ScriptCall(incr, ["a"], [2]), ScriptCall(fail, [], []), ScriptCall(incr, ["b"], [3])]
    await redis_client.script_flush()  # as after a restart
    replies = await run_script_calls(redis_client, calls)
    assert replies[0] == 2 and replies[2] == 3
    assert isinstance(replies[1], ResponseError)
    assert await redis_client.mget("a", "b") == [b"2", b"3"]


async def test_a_lone_call_goes_as_one_command(redis_client: aioredis.Redis) -> None:
    incr = redis_client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await redis_client.script_flush()
    assert await run_script_calls(redis_client, [ScriptCall(incr, ["a"], [5])]) == [5]
