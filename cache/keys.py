"""Redis keys built from caller-influenced parts (cache scopes, model ids, revisions) that never collide.

Joining parts with a separator lets two different tuples make one key (scope
"a:b" with id "c", and scope "a" with id "b:c"). So every part is either
percent-encoded before it is joined (a readable key segment: the separator
cannot occur inside one) or, where the key is a digest, fed to the hash with
its length in front. Either way distinct tuples give distinct keys.
"""

from __future__ import annotations

import hashlib
import urllib.parse


def _utf8(value: str) -> bytes:
    # surrogatepass: a lone surrogate (JSON allows "\ud800") is still a distinct, encodable id
    return value.encode("utf-8", "surrogatepass")


def key_segment(value: str) -> str:
    """`value` as one key segment: percent-encoded, so it holds no ':' (nor anything but [A-Za-z0-9_.~%-])."""
    return urllib.parse.quote_from_bytes(_utf8(value), safe="")


def digest_of_parts(*parts: str | bytes) -> hashlib._Hash:
    """A SHA-256 over `parts`, each length-prefixed: no two sequences of parts feed it the same bytes."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else _utf8(part)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest
