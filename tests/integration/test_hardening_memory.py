"""Memory under hostile input: zstd size bombs mixed with good requests, against a worker
process (`inference-worker run`) on real Mosquitto and Redis, its memory read from /proc.

The ledger: every good request is answered once with the model's own label; every bomb
gets one error response on its own reply topic and one dead letter; the worker's peak
resident memory stays within the documented worst case of one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from inference_worker.client import InferenceClient, Reply
from tests.integration.hostile import (
    Inbox,
    MiB,
    WorkerChild,
    bomb_envelope_head,
    dead_letters,
    expected_digits,
    heldout,
    hostile_settings,
    zstd_bomb,
)
from tests.servers import Server

pytestmark = pytest.mark.integration

# docs/reliability.md, "Bad input": "The worst-case memory held for decoding one request
# with the default limits is about 250 MiB". The bound for the whole hostile mix.
ONE_REQUEST_WORST_CASE = 250 * MiB
# Past this the worker is killed so the test machine stays safe (the test then fails).
RSS_KILL = 1536 * MiB
BODY = 60 * MiB  # each bomb's decompressed size, inside the 64 MiB limit
OVER = 70 * MiB  # over max_decompressed_bytes
N_BOMBS = N_GOOD = 200


def bombs(reply_prefix: str) -> list[tuple[str, bytes, str]]:
    """(reply topic, frame, expected error code) for each bomb, all distinct.

    Four kinds in turn: a well-formed request whose 60 MiB tensor does not fit its shape
    (declared size / not declared) -> invalid_input; 60 MiB that is not msgpack
    (declared / not declared) -> bad_request; and one of each declaring, or only while
    decompressing reaching, more than the 64 MiB limit -> too_large.
    """
    out: list[tuple[str, bytes, str]] = []
    for i in range(N_BOMBS):
        topic = f"{reply_prefix}/bomb/{i}"
        if i == 0:
            frame, code = zstd_bomb(b"bomb-0", OVER, declare=True), "too_large"
        elif i == 1:
            frame, code = zstd_bomb(b"bomb-1", OVER, declare=False), "too_large"
        elif i % 4 in (0, 1):
            head = bomb_envelope_head(f"bomb-{i}", BODY)
            frame, code = zstd_bomb(head, BODY, declare=i % 4 == 0), "invalid_input"
        else:
            frame, code = zstd_bomb(f"bomb-{i}".encode(), BODY, declare=i % 4 == 2), "bad_request"
        assert len(frame) < 16 * 1024  # a few KiB on the wire, far inside the 4 MiB limit
        out.append((topic, frame, code))
    return out


async def test_size_bombs_mixed_with_good_requests_stay_within_one_request_of_memory(
    mosquitto: Server, redis: Server, tmp_path: Path
) -> None:
    settings = hostile_settings(mosquitto.url, redis.url)
    resp = settings.broker.response_topic
    x, _ = heldout()
    labels = expected_digits(x)
    mix = bombs(f"{resp}/_")
    worker = WorkerChild(settings, "hostile-mix", tmp_path / "worker.log")
    killed_at: list[int] = []
    peak_rss = 0

    async def watchdog() -> None:
        nonlocal peak_rss
        while worker.proc.poll() is None:
            with contextlib.suppress(OSError, KeyError):
                rss, _ = worker.memory()
                peak_rss = max(peak_rss, rss)
                if rss > RSS_KILL:
                    worker.proc.send_signal(signal.SIGKILL)
                    killed_at.append(rss)
                    return
            await asyncio.sleep(0.05)

    good: dict[str, Reply] = {}
    failures: Counter[str] = Counter()

    async def ask(client: InferenceClient, i: int) -> None:
        row = i % len(x)
        request = client.make_request("digits", {"pixels": x[row : row + 1]}, id=f"good-{i}")
        try:
            good[request.id] = await client.send(request, timeout_s=120)
        except (TimeoutError, ConnectionError) as exc:
            failures[type(exc).__name__] += 1

    try:
        await worker.wait_ready()
        async with (
            InferenceClient.connect(
                mosquitto.url,
                request_topic=settings.broker.request_topic,
                response_topic=resp,
                resend_after_s=None,  # no resends: a second answer is a real duplicate
            ) as client,
            Inbox(mosquitto.url, [f"{resp}/_/bomb/#"]) as replies,
            Inbox(mosquitto.url, [settings.broker.dlq_topic]) as dlq,
        ):
            # Warm-up, then the baseline: the high-water mark of a worker that has served.
            warm = [client.make_request("digits", {"pixels": x[i : i + 1]}) for i in range(50)]
            await asyncio.gather(*(client.send(r, timeout_s=60) for r in warm))
            baseline = worker.memory()[1]
            guard = asyncio.create_task(watchdog())

            async def bomb(topic: str, frame: bytes) -> None:
                await replies.transport.publish(
                    settings.broker.request_topic, frame, reply_to=topic
                )

            sends = []
            for i, (topic, frame, _) in enumerate(mix):  # interleaved: bomb, good, bomb, ...
                sends.append(asyncio.create_task(bomb(topic, frame)))
                sends.append(asyncio.create_task(ask(client, i)))
            load = asyncio.gather(*sends)
            waiting: set[asyncio.Future[Any]] = {load, guard}
            await asyncio.wait(waiting, timeout=150, return_when=asyncio.FIRST_COMPLETED)
            if guard.done():  # killed: what is still pending will never be answered
                load.cancel()
            await asyncio.gather(load, return_exceptions=True)

            def settled() -> bool:
                return len(replies.messages) >= N_BOMBS and len(dlq.messages) >= N_BOMBS

            if not killed_at:
                await replies.wait_until(settled, within_s=30)
                await asyncio.sleep(0.5)  # a stray second copy would arrive by now
            hwm = baseline if killed_at else worker.memory()[1]  # sampled at the end
            guard.cancel()
            await asyncio.gather(guard, return_exceptions=True)
            duplicates = client.duplicates
    finally:
        worker.stop()

    answered_by_topic: Counter[str] = Counter(t for t, _ in replies.messages)
    codes = {t: r.error.code.value for t, r in replies.responses() if r and r.error}
    dead = Counter(bytes(e["payload"]) for e in dead_letters(dlq))
    wrong = [
        i
        for i, reply in good.items()
        if reply.response.status != "ok"
        or reply.response.outputs is None
        or int(reply.response.outputs["label"][0]) != int(labels[int(i[5:]) % len(x)])
    ]
    lost_good = N_GOOD - len(good)
    unanswered_bombs = [t for t, _, _ in mix if answered_by_topic[t] == 0]
    twice_answered = [t for t, _, _ in mix if answered_by_topic[t] > 1]
    wrong_code = [t for t, _, code in mix if t in codes and codes[t] != code]
    not_dead = [t for t, frame, _ in mix if dead[frame] == 0]
    twice_dead = [t for t, frame, _ in mix if dead[frame] > 1]
    print(
        f"hostile mix: {N_BOMBS} bombs + {N_GOOD} good; good lost {lost_good}, wrong "
        f"{len(wrong)}, duplicates {duplicates}, failures {dict(failures)}; bombs unanswered "
        f"{len(unanswered_bombs)}, answered twice {len(twice_answered)}, wrong code "
        f"{len(wrong_code)}, not dead-lettered {len(not_dead)}, dead-lettered twice "
        f"{len(twice_dead)}; VmHWM baseline {baseline / MiB:.0f} MiB, end {hwm / MiB:.0f} "
        f"MiB, peak RSS sampled {peak_rss / MiB:.0f} MiB"
        + (f"; KILLED at RSS {killed_at[0] / MiB:.0f} MiB" if killed_at else "")
    )
    assert not killed_at, (
        f"worker RSS passed {RSS_KILL / MiB:.0f} MiB ({killed_at[0] / MiB:.0f} MiB; "
        f"baseline VmHWM {baseline / MiB:.0f} MiB) and was killed; good answered "
        f"{len(good)}/{N_GOOD}"
    )
    assert lost_good == 0 and not wrong and duplicates == 0, (lost_good, wrong[:5], duplicates)
    assert not unanswered_bombs and not twice_answered, (unanswered_bombs[:5], twice_answered[:5])
    assert not wrong_code, [(t, codes[t]) for t in wrong_code[:5]]
    assert not not_dead and not twice_dead, (not_dead[:5], twice_dead[:5])
    assert hwm <= baseline + ONE_REQUEST_WORST_CASE, (
        f"worker VmHWM {hwm / MiB:.0f} MiB > baseline {baseline / MiB:.0f} MiB + "
        f"{ONE_REQUEST_WORST_CASE / MiB:.0f} MiB (docs/reliability.md one-request worst case)"
    )
