"""Coverage-guided fuzzing of the wire decoders with atheris (libFuzzer).

Run: python -m tests.fuzz.fuzz_decode -max_total_time=60 [corpus_dir]
Any exception other than ProtocolError is a crash; so is exceeding -rss_limit_mb, which
holds the decoder to its stated memory bound.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from inference_worker.protocol import Limits, ProtocolError, Request, WireCodec

# Small caps keep each input cheap; the checks are the same code paths as the defaults.
LIMITS = Limits(
    max_compressed_bytes=256 * 1024,
    max_decompressed_bytes=4 * 1024 * 1024,
    max_window_bytes=1024 * 1024,
    max_bin_len=4 * 1024 * 1024,
)
CODEC = WireCodec(LIMITS)


def test_one(data: bytes) -> None:
    # Both directions: workers decode requests, clients decode responses.
    for decode in (CODEC.decode_request, CODEC.decode_response):
        with contextlib.suppress(ProtocolError):
            decode(data)
    # The batch form never raises, and hands out errors with no traceback to keep alive.
    for result in CODEC.decode_requests([data, data[: len(data) // 2]]):
        if isinstance(result, ProtocolError):
            assert result.__traceback__ is None and result.__context__ is None
        else:
            assert isinstance(result, Request)


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
