"""`AsyncEngine`: the engine thread, the asyncio bridge, aborts, failures and health, over a fake `LLMEngine` (no JAX),
plus one run over the real bundled model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_server_support import ENGINE_KWARGS, FakeLLMEngine

from jpaged.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.request import RequestIdInUseError
from jpaged.sampling_params import SamplingParams


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def started(fake: FakeLLMEngine, **kwargs) -> AsyncEngine:
    engine = AsyncEngine(fake, **kwargs)  # type: ignore[arg-type]
    engine.start()
    return engine


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_outputs_flow_to_the_loop_and_finish():
    async def main():
        fake = FakeLLMEngine()
        engine = await started(fake)
        outputs = [o async for o in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=4, n=2))]
        assert outputs[-1].finished and outputs[-1].outputs[1].token_ids == [FakeLLMEngine.TOKEN] * 4
        assert all(not o.finished for o in outputs[:-1])
        assert engine.health().healthy
        await wait_for(lambda: engine.stats().num_running == 0)
        await engine.shutdown()
        assert not engine.health().healthy

    run(main())


def test_a_slow_reader_gets_the_newest_cumulative_output():
    async def main():
        engine = await started(FakeLLMEngine())
        outputs = await engine.add_request("r", [1], SamplingParams(max_tokens=20))
        await asyncio.sleep(0.3)  # the engine runs all 20 steps meanwhile
        first = await anext(outputs)
        assert first.finished and len(first.outputs[0].token_ids) == 20
        await engine.shutdown()

    run(main())


def test_a_validation_error_fails_only_that_request():
    async def main():
        engine = await started(FakeLLMEngine())
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad", [], SamplingParams())
        good = [o async for o in engine.generate("good", [5], SamplingParams(max_tokens=2))]
        assert good[-1].finished
        await engine.shutdown()

    run(main())


def test_an_id_in_use_is_refused_and_its_holder_keeps_running():
    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        holder = await engine.add_request("dup", [1], SamplingParams(max_tokens=4))
        with pytest.raises(RequestIdInUseError, match="'dup' is already in use"):
            await engine.add_request("dup", [2], SamplingParams(max_tokens=4))
        first = await anext(holder)
        assert first.request_id == "dup" and first.prompt_token_ids == [1] and not first.finished
        await holder.aclose()
        await wait_for(lambda: "dup" in fake.aborted)
        await engine.shutdown()

    run(main())


def test_closing_the_iterator_aborts_within_a_step():
    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        outputs = await engine.add_request("r", [1], SamplingParams(max_tokens=5))
        await anext(outputs)
        await outputs.aclose()  # type: ignore[attr-defined]
        await wait_for(lambda: fake.aborted == ["r"])
        assert not fake.requests
        await engine.shutdown()

    run(main())


@pytest.mark.parametrize("how", ["closed", "dropped", "read-cancelled"])
def test_an_iterator_never_read_still_aborts(how):
    """Closed before its first read (a client gone before its response started), dropped unclosed, or a read
    cancelled: the request is aborted and forgotten, and its id is free again; a finished one is not aborted."""

    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        outputs = await engine.add_request("r", [1], SamplingParams())
        if how == "closed":
            await outputs.aclose()
        elif how == "dropped":
            del outputs
        else:  # a read that waits (the engine is held mid-step) and is cancelled
            await wait_for(lambda: fake.num_steps >= 2)  # the first step's output is out
            fake.block = threading.Event()
            steps = fake.num_steps
            await wait_for(lambda: fake.num_steps > steps)  # a step began after the block: no output comes now
            await anext(outputs)  # what the steps before made
            read = asyncio.ensure_future(anext(outputs))
            await asyncio.sleep(0.05)
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            fake.block.set()
        await wait_for(lambda: fake.aborted == ["r"])
        assert not fake.requests and "r" not in engine._streams
        fake.never_finish = False
        done = [o async for o in await engine.add_request("r", [1], SamplingParams(max_tokens=2))]
        assert done[-1].finished and fake.aborted == ["r"]  # the second, finished, was not aborted
        await engine.shutdown()

    run(main())


def test_a_cancelled_consumer_aborts():
    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)

        async def consume():
            async for _ in engine.generate("r", [1], SamplingParams()):
                pass

        task = asyncio.create_task(consume())
        await wait_for(lambda: fake.num_steps > 3)
        task.cancel()
        await wait_for(lambda: fake.aborted == ["r"])
        await engine.shutdown()

    run(main())


def test_abort_ends_the_stream_quietly():
    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        outputs = await engine.add_request("r", [1], SamplingParams())
        await anext(outputs)
        engine.abort("r")
        rest = [o async for o in outputs]  # ends: at most an output that arrived before the abort
        assert len(rest) <= 1 and not any(o.finished for o in rest)
        await wait_for(lambda: fake.aborted == ["r"])
        await engine.shutdown()

    run(main())


def test_an_id_submitted_again_after_its_abort_gets_only_its_own_outputs():
    """An output of the first submission that was on its way when the id was aborted and submitted again (the
    server takes client-chosen ids: a client that drops a stream and retries with its id) is not the second's."""

    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        first = await engine.add_request("r", [1], SamplingParams(max_tokens=10**9))
        await anext(first)
        held = fake.block = threading.Event()
        steps = fake.num_steps
        await wait_for(lambda: fake.num_steps > steps)  # the engine thread waits inside a step
        engine.abort("r")
        again = asyncio.create_task(engine.add_request("r", [7, 7], SamplingParams(max_tokens=3)))
        await asyncio.sleep(0)  # the second submission's stream is registered
        fake.never_finish = False
        fake.block = threading.Event()  # the step after the held one (the second's first) waits too
        held.set()  # the held step ends with an output of the first submission, handed over before the abort
        second = await again
        next_output = asyncio.create_task(anext(second))
        await asyncio.sleep(0.05)  # what reached the second's stream by now came from the first submission
        fake.block.set()
        outputs = [await next_output] + [o async for o in second]
        assert [o.prompt_token_ids for o in outputs] == [[7, 7]] * len(outputs) and outputs[-1].finished
        assert len(outputs[-1].outputs[0].token_ids) == 3
        await wait_for(lambda: fake.aborted == ["r"] and not fake.requests)
        await engine.shutdown()

    run(main())


def test_a_failing_step_kills_the_loop_and_fails_everyone():
    async def main():
        fake = FakeLLMEngine()
        fake.never_finish = True
        engine = await started(fake)
        outputs = await engine.add_request("r", [1], SamplingParams())
        await anext(outputs)
        fake.fail_step = RuntimeError("device lost")
        with pytest.raises(EngineDeadError, match="RuntimeError"):
            async for _ in outputs:
                pass
        health = engine.health()
        assert not health.healthy and "RuntimeError" in health.reason
        with pytest.raises(EngineDeadError):
            await engine.add_request("later", [1], SamplingParams())
        await engine.shutdown()

    run(main())


def test_a_stalled_step_makes_health_fail_and_recover():
    async def main():
        fake = FakeLLMEngine()
        fake.block = threading.Event()
        engine = await started(fake, stall_timeout_s=0.2)
        assert engine.health().healthy  # idle: no work, no stall
        outputs = await engine.add_request("r", [1], SamplingParams(max_tokens=2))
        await asyncio.sleep(0.4)
        health = engine.health()
        assert not health.healthy and "no progress" in health.reason
        fake.block.set()
        assert [o async for o in outputs][-1].finished
        assert engine.health().healthy
        await engine.shutdown()

    run(main())


def test_the_waiting_cap_refuses_with_queue_full():
    async def main():
        fake = FakeLLMEngine()
        fake.block = threading.Event()  # nothing gets its first output while blocked
        engine = await started(fake, max_waiting_requests=2)
        submissions = [asyncio.create_task(engine.add_request(r, [1], SamplingParams(max_tokens=1))) for r in "ab"]
        await wait_for(lambda: engine.num_unstarted == 2)
        with pytest.raises(QueueFullError):
            await engine.add_request("c", [1], SamplingParams(max_tokens=1))
        fake.block.set()
        for outputs in await asyncio.gather(*submissions):
            assert [o async for o in outputs][-1].finished
        c = [o async for o in engine.generate("c", [1], SamplingParams(max_tokens=1))]
        assert c[-1].finished
        await engine.shutdown()

    run(main())


def test_a_submission_cancelled_before_acceptance_is_aborted():
    async def main():
        fake = FakeLLMEngine()
        fake.block = threading.Event()
        fake.never_finish = True
        engine = await started(fake)
        first = await engine.add_request("first", [1], SamplingParams())  # the thread is now blocked in a step
        await wait_for(lambda: fake.num_steps == 1)
        task = asyncio.create_task(engine.add_request("late", [1], SamplingParams()))
        await asyncio.sleep(0.05)
        task.cancel()
        fake.block.set()
        await wait_for(lambda: "late" in fake.aborted)
        await first.aclose()  # type: ignore[attr-defined]
        await engine.shutdown()

    run(main())


def test_the_real_engine_frees_every_page_after_aborts():
    async def main():
        llm_engine = LLMEngine(EngineConfig(**ENGINE_KWARGS))
        engine = AsyncEngine(llm_engine)
        engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        streams = [await engine.add_request(f"r{i}", "Once upon a time", params) for i in range(6)]
        for i, outputs in enumerate(streams):
            first = await anext(outputs)
            assert first.outputs[0].token_ids
            if i % 2:
                await outputs.aclose()  # type: ignore[attr-defined]
        finished = [[o async for o in s][-1] for i, s in enumerate(streams) if i % 2 == 0]
        assert all(len(o.outputs[0].token_ids) == 30 for o in finished)
        await wait_for(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0)
        await engine.shutdown()
        assert llm_engine.pool.all_free() and not llm_engine.has_unfinished_requests()

    run(main())
