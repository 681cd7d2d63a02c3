"""Client-side TLS files and the SSL context made from them (shared with the worker's
broker and Redis connections, which import it from here).

TLS 1.2 or newer, the server certificate checked against the given CA bundle (the
system CAs when none is given) and its hostname verified; a client certificate and key
for mutual TLS when given.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsOptions:
    """Client-side TLS files (PEM). Empty strings mean: not given."""

    ca_file: str = ""  # CA bundle that signed the server certificate; "" = system CAs
    cert_file: str = ""  # client certificate (mutual TLS), with key_file
    key_file: str = ""

    @property
    def given(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("TLS client certificate and key must be given together")

    def context(self) -> ssl.SSLContext:
        """A client context: verify the server (CA file or system CAs) and its hostname."""
        self.check()
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f for f in (self.ca_file, self.cert_file, self.key_file) if f)
            raise ValueError(f"cannot load TLS files ({files}): {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
