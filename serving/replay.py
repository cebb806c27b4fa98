"""Recent replies, so that a retried request is answered once: retries are idempotent by request id.

The key is the request id together with a digest of the payload: a retry (same id, same activations)
gets the cached answer without recomputation, while nobody can fetch another client's answer by
guessing its id. The audit flag is part of the key, so a cached user reply never answers an audit (which
is counted apart and must reach the cloud). Degraded answers are never cached, so a retry after an outage
tries the full path again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

from cartosplit.protos import tiers_pb2 as pb


class ReplyCache:
    def __init__(self, max_entries: int = 4096, ttl_s: float = 60.0) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[bytes, tuple[float, pb.InferReply]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(request: pb.InferRequest) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        for part in (
            request.request_id.encode(),
            request.bundle_id.encode(),
            request.depth.to_bytes(4, "little"),
            request.hidden.SerializeToString(),
            request.input_ids.SerializeToString(),
            request.token_type_ids.SerializeToString(),
            b"\x01" if request.audit else b"\x00",
        ):
            digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two layouts collide
            digest.update(part)
        return digest.digest()

    def get(self, key: bytes) -> pb.InferReply | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored, reply = entry
            if time.monotonic() - stored > self.ttl_s:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return reply

    def put(self, key: bytes, reply: pb.InferReply) -> None:
        if reply.degraded:
            return
        with self._lock:
            self._entries[key] = (time.monotonic(), reply)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
