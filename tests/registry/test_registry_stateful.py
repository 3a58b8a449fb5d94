"""A hypothesis state machine over the registry's HTTP API against a real `clawstore serve` process
(both backend variants), checked step by step against an in-memory model of what each repository
holds: upload sessions (chunked with and without Content-Range, out-of-order chunks, status,
completion with the right or a wrong digest, cancel), monolithic uploads, cross-repository mounts,
manifests by tag, by digest and by digest with ?tag= (with a subject or not; naming a blob the
registry does not have: refused), referrers with and without the artifactType filter, tag and
manifest and blob deletion, tag listing with and without n / last, blob reads with and without
Range.

Invariants on every response: never a 5xx; every error with a body has the spec's JSON form
{"errors": [{"code": ...}]} with a code from the spec's table. Where the spec (or RFC 9110 for
Range) allows several answers, exactly that set is accepted; where it leaves a choice to the
registry and clawstore has made it (a manifest naming an unknown blob is refused; a blob is
known when it is linked to a repository the caller may pull), that choice is asserted.

Every example runs in a fresh namespace with a principal granted only that namespace, so what
earlier examples left on the (long-lived) server can neither be seen nor referenced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from conftest import Registry
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from regclient import OCI_MANIFEST, SPEC_CODES, manifest_bytes, sha256


def _noise(n: int, seed: bytes) -> bytes:
    out = b""
    while len(out) < n:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return out[:n]


#: The blob contents the machine pushes: empty, the empty JSON object, tiny, and a few KiB.
POOL: list[bytes] = [
    b"",
    b"{}",
    b"x",
    b"layer-two",
    _noise(1024, b"a"),
    _noise(3000, b"b"),
    _noise(5000, b"c"),
]
TAGS = ["latest", "v1", "v1.0", "V2", "a_b-9"]
REPOS = ["app", "team/lib"]
REPO = st.sampled_from(range(len(REPOS)))
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"  # what regclient.manifest_bytes declares
NO_MANIFEST = sha256(b"no such manifest")


@dataclass
class Session:
    repo: str
    location: str
    target: bytes  # what the chunks are cut from
    data: bytes  # what the server holds so far

    @property
    def upload_id(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[1].split("?")[0]


def _range_header(n: int) -> str:
    return f"0-{max(n - 1, 0)}"


def _expected_range(header: str, size: int) -> tuple[int, int] | str:
    """What RFC 9110 (14.1.1, 14.2) makes of `Range: header` on a GET of `size` bytes: the
    (first, last) bytes to send in a 206 (or the whole in a 200: a server MAY ignore Range);
    "unsatisfiable" (416, or the whole in a 200); "whole" where only a 200 with the whole
    representation is right: a suffix range of an empty representation (satisfiable, yet no
    206 can say "zero bytes"). A range whose last byte is before its first is "unsatisfiable"
    here: RFC 9110 would have it ignored, the OCI conformance suite wants 416."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header)
    assert m is not None
    a, b = m.group(1), m.group(2)
    if not a:  # suffix-range
        n = int(b)
        if n == 0:
            return "unsatisfiable"
        if size == 0:
            return "whole"
        return max(size - n, 0), size - 1
    first = int(a)
    if b and int(b) < first:
        # RFC 9110 says ignore it (200); Go's net/http (distribution) and the OCI conformance
        # suite answer 416: either is taken
        return "unsatisfiable"
    if first >= size:
        return "unsatisfiable"
    return first, min(int(b), size - 1) if b else size - 1


def make_machine(registry: Registry) -> type[RuleBasedStateMachine]:
    class RegistryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            ns = f"st{uuid.uuid4().hex[:10]}"
            grants = [(a, f"{ns}/**") for a in ("pull", "push", "delete")]
            self.c = registry.client(registry.user(f"u{ns}", *grants))
            self.repos = [f"{ns}/{r}" for r in REPOS]
            self.missing = b"never pushed"  # (the same in every example: the draws must not vary)
            # the model
            self.contents: dict[str, bytes] = {sha256(p): p for p in [*POOL, self.missing]}
            self.blobs: dict[str, set[str]] = {r: set() for r in self.repos}  # uploaded / mounted
            self.manifests: dict[str, set[str]] = {r: set() for r in self.repos}
            self.tags: dict[str, dict[str, str]] = {r: {} for r in self.repos}
            self.touched: set[str] = set()  # anything ever tried on it
            self.mbytes: dict[str, bytes] = {}
            self.mrefs: dict[str, set[str]] = {}
            self.msubject: dict[str, str] = {}
            self.sessions: dict[int, Session] = {}
            self.dead: list[Session] = []
            self.next_id = 0

        def teardown(self) -> None:
            self.c.close()

        # -- the model's questions ---------------------------------------------------------
        def readable(self, repo: str, d: str) -> bool:
            return d in self.blobs[repo] or any(d in self.mrefs[m] for m in self.manifests[repo])

        def known(self, d: str) -> bool:
            return any(self.readable(r, d) for r in self.repos)

        def has_content(self, repo: str) -> bool:
            return bool(self.blobs[repo] or self.manifests[repo] or self.tags[repo])

        # -- HTTP with the invariants --------------------------------------------------------
        def req(self, method: str, url: str, **kw: Any) -> httpx.Response:
            r = self.c.request(method, url, **kw)
            body = kw.get("content")
            size = len(body) if isinstance(body, bytes) else ("stream" if body is not None else 0)
            hdrs = {k: v for k, v in (kw.get("headers") or {}).items() if k != "Content-Type"}
            params = kw.get("params")
            shown = {
                k: r.headers[k]
                for k in ("Location", "Range", "Docker-Content-Digest", "Content-Range")
                if k in r.headers
            }
            text = r.content[:200] if r.status_code >= 400 else b""
            note(f"{method} {url} params={params} {hdrs} body={size} -> {r.status_code} {shown} {text!r}")
            assert r.status_code < 500, f"{method} {url}: {r.status_code} {r.text}"
            if r.status_code >= 400 and method != "HEAD" and r.content:
                obj = r.json()
                assert isinstance(obj, dict) and isinstance(obj.get("errors"), list) and obj["errors"], obj
                for e in obj["errors"]:
                    assert e["code"] in SPEC_CODES, f"{method} {url}: {r.status_code} code {e['code']!r}"
            return r

        @staticmethod
        def codes(r: httpx.Response) -> list[str]:
            return [e["code"] for e in r.json()["errors"]]

        def pick_session(self, i: int) -> Session:
            keys = sorted(self.sessions)
            return self.sessions[keys[i % len(keys)]]

        def pick_content(self, i: int, present_in: str | None = None) -> tuple[str, bytes]:
            """The i-th known content; with `present_in`, one readable there if there are any."""
            keys = sorted(self.contents)
            if present_in is not None:
                keys = [d for d in keys if self.readable(present_in, d)] or keys
            d = keys[i % len(keys)]
            return d, self.contents[d]

        def add_session(self, repo: str, r: httpx.Response, target: bytes) -> None:
            assert r.status_code == 202, r.text
            assert r.headers["Range"] == "0-0"
            self.sessions[self.next_id] = Session(repo, r.headers["Location"], target, b"")
            self.next_id += 1

        def check_status(self, s: Session) -> None:
            r = self.req("GET", s.location)
            assert r.status_code == 204, r.text
            assert r.headers["Range"] == _range_header(len(s.data))
            assert "Location" in r.headers

        @initialize(
            blobs=st.lists(st.tuples(REPO, st.integers(0, len(POOL) - 1)), max_size=6, unique=True),
            images=st.lists(
                st.tuples(REPO, st.sampled_from(TAGS), st.integers(0, 8), st.none() | st.integers(0, 3)),
                max_size=3,
            ),
        )
        def seed(self, blobs: list[tuple[int, int]], images: list[tuple[int, str, int, int | None]]) -> None:
            """Some blobs (monolithic POSTs) and tagged manifests of them to start from, so that
            most examples' reads, mounts, tag and manifest operations find something."""
            for repo, content in blobs:
                self.monolithic(repo, content, False)
            for repo, tag, i, subject in images:
                self.put_manifest(repo, i, [i + 1], 0, tag, tag, True, subject)

        # -- upload sessions -------------------------------------------------------------------
        @rule(repo=REPO, content=st.integers(0, 7))
        def start_upload(self, repo: int, content: int) -> None:
            name = self.repos[repo]
            self.touched.add(name)
            r = self.req("POST", f"/v2/{name}/blobs/uploads/", headers={"Content-Length": "0"})
            self.add_session(name, r, POOL[content % len(POOL)])

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20), n=st.integers(0, 6000), streamed=st.booleans())
        def patch_chunk(self, i: int, n: int, streamed: bool) -> None:
            """The next chunk of the session's target: with Content-Range, or streamed (chunked
            transfer encoding, no Content-Range: what docker sends)."""
            s = self.pick_session(i)
            off = len(s.data)
            chunk = s.target[off : off + n]
            if not chunk and not streamed:
                return  # an empty range cannot be written as Content-Range
            h = {"Content-Type": "application/octet-stream"}
            if streamed:
                r = self.req("PATCH", s.location, content=iter([chunk[:7], chunk[7:]]), headers=h)
            else:
                h["Content-Range"] = f"{off}-{off + len(chunk) - 1}"
                r = self.req("PATCH", s.location, content=chunk, headers=h)
            assert r.status_code == 202, r.text
            s.data += chunk
            assert r.headers["Range"] == _range_header(len(s.data))
            s.location = r.headers["Location"]

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20), delta=st.integers(-40, 40).filter(bool), n=st.integers(1, 64))
        def patch_out_of_order(self, i: int, delta: int, n: int) -> None:
            """A chunk that does not start where the session is: 416 with the current Range,
            and the session unchanged."""
            s = self.pick_session(i)
            start = len(s.data) + delta
            if start < 0:
                start = len(s.data) + 1
            chunk = (s.target + b"pad" * 30)[:n]
            h = {"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + n - 1}"}
            r = self.req("PATCH", s.location, content=chunk, headers=h)
            assert r.status_code == 416, r.text
            assert r.headers["Range"] == _range_header(len(s.data))
            self.check_status(s)

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20))
        def patch_malformed_range(self, i: int) -> None:
            """A Content-Range that is not `<start>-<end>` with start <= end: refused (the spec's
            regexp does not say which 4xx; 416 in the v1.0 text), the session unchanged."""
            s = self.pick_session(i)
            off = len(s.data)
            h = {"Content-Type": "application/octet-stream", "Content-Range": f"{off + 2}-{off}"}
            r = self.req("PATCH", s.location, content=b"abc", headers=h)
            assert r.status_code in (400, 416), r.text
            self.check_status(s)

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20))
        def upload_status(self, i: int) -> None:
            self.check_status(self.pick_session(i))

        @precondition(lambda self: self.sessions)
        @rule(
            i=st.integers(0, 20),
            tail=st.sampled_from(["none", "body", "body+range"]),
            digest=st.sampled_from(["target", "actual", "wrong"]),
        )
        def finish_upload(self, i: int, tail: str, digest: str) -> None:
            """PUT ?digest=, with the rest of the target as the last chunk or not: 201 and the
            blob in the repository when the digest is that of everything sent, else 400
            DIGEST_INVALID and nothing stored."""
            key = sorted(self.sessions)[i % len(self.sessions)]
            s = self.sessions[key]
            last = s.target[len(s.data) :] if tail != "none" else b""
            whole = s.data + last
            d = {"target": sha256(s.target), "actual": sha256(whole), "wrong": sha256(whole + b"\0")}[digest]
            h = {"Content-Type": "application/octet-stream"}
            if tail == "body+range" and last:
                h["Content-Range"] = f"{len(s.data)}-{len(whole) - 1}"
            before = self.readable(s.repo, d)
            r = self.req("PUT", s.location, params={"digest": d}, content=last, headers=h)
            if d == sha256(whole):
                assert r.status_code == 201, r.text
                assert r.headers["Docker-Content-Digest"] == d
                assert "Location" in r.headers
                self.contents.setdefault(d, whole)
                self.blobs[s.repo].add(d)
                del self.sessions[key]
                self.dead.append(s)
                self.check_blob_presence(s.repo, d)
                return
            assert r.status_code == 400 and self.codes(r) == ["DIGEST_INVALID"], r.text
            assert self.head_blob(s.repo, d) == before
            assert self.head_blob(s.repo, sha256(whole)) == self.readable(s.repo, sha256(whole))
            # The spec leaves the session's fate open after a 4xx: gone, or as it was (with or
            # without the refused last chunk).
            st_ = self.req("GET", s.location)
            if st_.status_code == 404:
                assert self.codes(st_) == ["BLOB_UPLOAD_UNKNOWN"]
                del self.sessions[key]
                self.dead.append(s)
                return
            assert st_.status_code == 204, st_.text
            assert st_.headers["Range"] in (_range_header(len(s.data)), _range_header(len(whole)))
            if st_.headers["Range"] != _range_header(len(s.data)):
                s.data = whole

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20))
        def cancel_upload(self, i: int) -> None:
            key = sorted(self.sessions)[i % len(self.sessions)]
            s = self.sessions.pop(key)
            r = self.req("DELETE", s.location)
            assert r.status_code == 204, r.text
            self.dead.append(s)
            r = self.req("GET", s.location)
            assert r.status_code == 404 and self.codes(r) == ["BLOB_UPLOAD_UNKNOWN"], r.text

        @precondition(lambda self: self.dead)
        @rule(i=st.integers(0, 20), method=st.sampled_from(["GET", "PATCH", "PUT", "DELETE"]))
        def use_ended_session(self, i: int, method: str) -> None:
            """A completed or cancelled session is unknown from then on, whatever is sent to it."""
            s = self.dead[i % len(self.dead)]
            kw: dict[str, Any] = {}
            if method == "PATCH":
                kw = {"content": b"abc", "headers": {"Content-Range": f"{len(s.data)}-{len(s.data) + 2}"}}
            if method == "PUT":
                kw = {"params": {"digest": sha256(s.data + b"abc")}, "content": b"abc"}
            r = self.req(method, s.location, **kw)
            assert r.status_code == 404 and self.codes(r) == ["BLOB_UPLOAD_UNKNOWN"], r.text
            assert not self.head_blob(s.repo, sha256(s.data + b"abc"))

        @precondition(lambda self: self.sessions)
        @rule(i=st.integers(0, 20))
        def session_of_another_repository(self, i: int) -> None:
            s = self.pick_session(i)
            repo = self.repos[(self.repos.index(s.repo) + 1) % len(self.repos)]
            r = self.req("GET", f"/v2/{repo}/blobs/uploads/{s.upload_id}")
            assert r.status_code == 404 and self.codes(r) == ["BLOB_UPLOAD_UNKNOWN"], r.text

        # -- monolithic and mount ------------------------------------------------------------------
        @rule(repo=REPO, content=st.integers(0, 7), wrong=st.booleans())
        def monolithic(self, repo: int, content: int, wrong: bool) -> None:
            name = self.repos[repo]
            self.touched.add(name)
            data = POOL[content % len(POOL)]
            d = sha256(data + b"\0") if wrong else sha256(data)
            r = self.req(
                "POST",
                f"/v2/{name}/blobs/uploads/",
                params={"digest": d},
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            if wrong:
                assert r.status_code == 400 and self.codes(r) == ["DIGEST_INVALID"], r.text
                assert not self.head_blob(name, d)
                assert self.head_blob(name, sha256(data)) == self.readable(name, sha256(data))
                return
            assert r.status_code == 201, r.text
            assert r.headers["Docker-Content-Digest"] == d and "Location" in r.headers
            self.blobs[name].add(d)
            self.check_blob_presence(name, d)

        @rule(
            repo=REPO,
            src=REPO,
            content=st.integers(0, 30),
            present=st.booleans(),
        )
        def mount(self, repo: int, src: int, content: int, present: bool) -> None:
            """201 when the blob is in `from` (the caller may pull there), else an upload session."""
            name, source = self.repos[repo], self.repos[src]
            self.touched.add(name)
            d, data = self.pick_content(content, source if present else None)
            r = self.req(
                "POST",
                f"/v2/{name}/blobs/uploads/",
                params={"mount": d, "from": source},
                headers={"Content-Length": "0"},
            )
            if self.readable(source, d):
                assert r.status_code == 201, r.text
                assert r.headers["Docker-Content-Digest"] == d and "Location" in r.headers
                self.blobs[name].add(d)
                self.check_blob_presence(name, d)
            else:
                self.add_session(name, r, data)
                assert not self.head_blob(name, d) or self.readable(name, d)

        # -- blobs -------------------------------------------------------------------------------
        def head_blob(self, repo: str, d: str) -> bool:
            r = self.req("HEAD", f"/v2/{repo}/blobs/{d}")
            assert r.status_code in (200, 404), r.status_code
            return r.status_code == 200

        def check_blob_presence(self, repo: str, d: str) -> None:
            assert self.head_blob(repo, d) == self.readable(repo, d)

        @rule(
            repo=REPO,
            content=st.integers(0, 30),
            method=st.sampled_from(["GET", "HEAD"]),
            present=st.booleans(),
        )
        def read_blob(self, repo: int, content: int, method: str, present: bool) -> None:
            name = self.repos[repo]
            d, data = self.pick_content(content, name if present else None)
            r = self.req(method, f"/v2/{name}/blobs/{d}")
            if not self.readable(name, d):
                assert r.status_code == 404, r.status_code
                if method == "GET":
                    assert self.codes(r) == ["BLOB_UNKNOWN"]
                return
            assert r.status_code == 200, r.text
            assert r.headers["Docker-Content-Digest"] == d
            assert int(r.headers["Content-Length"]) == len(data)
            if method == "GET":
                assert r.content == data

        @rule(
            repo=REPO,
            content=st.integers(0, 30),
            a=st.integers(0, 5100),
            b=st.integers(0, 5100),
            form=st.sampled_from(["a-b", "a-", "-b"]),
            present=st.booleans(),
        )
        def read_blob_range(self, repo: int, content: int, a: int, b: int, form: str, present: bool) -> None:
            """A satisfiable range: 206 with exactly those bytes (or 200 and the whole: a server
            MAY ignore Range); an unsatisfiable or backwards one: 416 (or 200)."""
            name = self.repos[repo]
            d, data = self.pick_content(content, name if present else None)
            if data and form != "-b":  # mostly inside the blob
                a %= len(data) + 1
            header = {"a-b": f"bytes={a}-{b}", "a-": f"bytes={a}-", "-b": f"bytes=-{b}"}[form]
            r = self.req("GET", f"/v2/{name}/blobs/{d}", headers={"Range": header})
            if not self.readable(name, d):
                assert r.status_code == 404 and self.codes(r) == ["BLOB_UNKNOWN"], r.status_code
                return
            want = _expected_range(header, len(data))
            if r.status_code == 200:
                assert r.content == data
                return
            assert want != "whole", f"Range: {header} on {len(data)} bytes: {r.status_code}, not 200"
            if want == "unsatisfiable":
                assert r.status_code == 416, r.status_code
                assert r.headers.get("Content-Range") in (None, f"bytes */{len(data)}")
                return
            assert isinstance(want, tuple)
            first, last = want
            assert r.status_code == 206, r.status_code
            assert r.content == data[first : last + 1]
            assert r.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"

        @rule(repo=REPO, content=st.integers(0, 30), present=st.booleans())
        def delete_blob(self, repo: int, content: int, present: bool) -> None:
            """202 for a blob uploaded or mounted here; 404 BLOB_UNKNOWN for one not here at all.
            One here only through a manifest that references it: either (the spec does not say)."""
            name = self.repos[repo]
            d, _ = self.pick_content(content, name if present else None)
            r = self.req("DELETE", f"/v2/{name}/blobs/{d}")
            if d in self.blobs[name]:
                assert r.status_code == 202, r.text
                self.blobs[name].discard(d)
            elif self.readable(name, d):
                assert r.status_code in (202, 404), r.text
            else:
                assert r.status_code == 404 and self.codes(r) == ["BLOB_UNKNOWN"], r.text
            self.check_blob_presence(name, d)

        # -- manifests -------------------------------------------------------------------------
        @rule(
            repo=REPO,
            config=st.integers(0, 8),
            layers=st.lists(st.integers(0, 8), max_size=3),
            salt=st.integers(0, 3),
            ref=st.sampled_from([*TAGS, "@digest", "@digest?tag"]),
            extra=st.sampled_from(TAGS),
            present=st.booleans(),
            subject=st.none() | st.integers(0, 30),
        )
        def put_manifest(
            self,
            repo: int,
            config: int,
            layers: list[int],
            salt: int,
            ref: str,
            extra: str,
            present: bool,
            subject: int | None = None,
        ) -> None:
            """201 when every blob it names is in the registry (for this caller); else 400
            MANIFEST_BLOB_UNKNOWN (the spec's code for this rejection) and nothing stored. A
            subject need not exist ("MUST initially accept"); OCI-Subject names it."""
            name = self.repos[repo]
            self.touched.add(name)
            pool = [*POOL, self.missing]
            if present:  # only blobs the registry has, if it has any
                pool = [self.contents[d] for d in sorted(self.contents) if self.known(d)] or pool
            cfg = pool[config % len(pool)]
            lays = [pool[x % len(pool)] for x in layers]
            subj = None
            if subject is not None:
                cands = [*sorted(self.mbytes), NO_MANIFEST]
                sd = cands[subject % len(cands)]
                subj = (sd, len(self.mbytes.get(sd, b"1234567")))
            body = manifest_bytes(
                [(sha256(x), len(x)) for x in lays],
                config=(sha256(cfg), len(cfg)),
                annotations={"salt": str(salt)} if salt else None,
                subject=subj,
            )
            md = sha256(body)
            refs = {sha256(cfg), *(sha256(x) for x in lays)}
            params = {"tag": extra} if ref == "@digest?tag" else None
            path_ref = md if ref.startswith("@") else ref
            r = self.req(
                "PUT",
                f"/v2/{name}/manifests/{path_ref}",
                content=body,
                params=params,
                headers={"Content-Type": OCI_MANIFEST},
            )
            if all(self.known(x) for x in refs):
                assert r.status_code == 201, r.text
                assert r.headers["Docker-Content-Digest"] == md and "Location" in r.headers
                if subj is not None:
                    assert r.headers.get("OCI-Subject") == subj[0], r.headers
                    self.msubject[md] = subj[0]
                self.mbytes[md] = body
                self.mrefs[md] = refs
                self.manifests[name].add(md)
                if not ref.startswith("@"):
                    self.tags[name][ref] = md
                if params:
                    assert r.headers.get("OCI-Tag") == extra
                    self.tags[name][extra] = md
                return
            assert r.status_code == 400 and self.codes(r) == ["MANIFEST_BLOB_UNKNOWN"], r.text
            self.check_manifest(name, md, "HEAD")

        @rule(repo=REPO, salt=st.integers(1, 3))
        def put_manifest_wrong_digest(self, repo: int, salt: int) -> None:
            """A body that is not the digest in the URL: 400, nothing stored."""
            name = self.repos[repo]
            self.touched.add(name)
            body = manifest_bytes([], config=(sha256(b"{}"), 2), annotations={"salt": str(salt)})
            if not self.known(sha256(b"{}")):
                return
            wrong = sha256(body + b" ")
            r = self.req(
                "PUT", f"/v2/{name}/manifests/{wrong}", content=body, headers={"Content-Type": OCI_MANIFEST}
            )
            assert r.status_code == 400 and self.codes(r)[0] in ("DIGEST_INVALID", "MANIFEST_INVALID"), r.text
            self.check_manifest(name, wrong, "GET")
            self.check_manifest(name, sha256(body), "GET")

        def check_manifest(self, repo: str, ref: str, method: str) -> None:
            r = self.req(method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            md = self.tags[repo].get(ref) if ":" not in ref else ref
            if md is None or md not in self.manifests[repo]:
                assert r.status_code == 404, r.status_code
                if method == "GET":
                    assert self.codes(r) == ["MANIFEST_UNKNOWN"]
                return
            assert r.status_code == 200, r.text
            assert r.headers["Docker-Content-Digest"] == md
            assert int(r.headers["Content-Length"]) == len(self.mbytes[md])
            assert r.headers["Content-Type"] == OCI_MANIFEST
            if method == "GET":
                assert r.content == self.mbytes[md]

        @rule(
            repo=REPO,
            ref=st.sampled_from(TAGS) | st.integers(0, 30),
            method=st.sampled_from(["GET", "HEAD"]),
            present=st.booleans(),
        )
        def get_manifest(self, repo: int, ref: str | int, method: str, present: bool) -> None:
            """By tag or digest (one of any repository's, or one here if `present`)."""
            name = self.repos[repo]
            if isinstance(ref, int):
                known = sorted(self.manifests[name] if present else self.mbytes)
                known = known or sorted(self.mbytes) or [sha256(b"no manifest")]
                ref = known[ref % len(known)]
            elif present and self.tags[name]:
                ref = sorted(self.tags[name])[TAGS.index(ref) % len(self.tags[name])]
            self.check_manifest(name, ref, method)

        @rule(repo=REPO)
        def list_tags(self, repo: int) -> None:
            """200 with the model's tags in lexical order for a repository with content; 404
            NAME_UNKNOWN for one never pushed to; either for one whose content is all deleted."""
            name = self.repos[repo]
            r = self.req("GET", f"/v2/{name}/tags/list")
            if not self.has_content(name):
                if name not in self.touched:
                    assert r.status_code == 404 and self.codes(r) == ["NAME_UNKNOWN"], r.text
                    return
                if r.status_code == 404:
                    assert self.codes(r) == ["NAME_UNKNOWN"], r.text
                    return
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["name"] == name
            assert set(got["tags"]) == set(self.tags[name])
            # "lexical order (i.e. case-insensitive alphanumeric order)": the two readings
            assert got["tags"] in (sorted(self.tags[name]), sorted(self.tags[name], key=str.lower))

        @rule(repo=REPO, tag=st.sampled_from(TAGS), present=st.booleans())
        def delete_tag(self, repo: int, tag: str, present: bool) -> None:
            name = self.repos[repo]
            if present and self.tags[name]:
                tag = sorted(self.tags[name])[TAGS.index(tag) % len(self.tags[name])]
            r = self.req("DELETE", f"/v2/{name}/manifests/{tag}")
            if tag in self.tags[name]:
                assert r.status_code == 202, r.text
                md = self.tags[name].pop(tag)
                self.check_manifest(name, tag, "HEAD")
                self.check_manifest(name, md, "HEAD")  # still there by digest
            else:
                assert r.status_code == 404, r.text
                assert self.codes(r) in (["MANIFEST_UNKNOWN"], ["NAME_UNKNOWN"]), r.text

        @precondition(lambda self: self.mbytes)
        @rule(repo=REPO, i=st.integers(0, 30), present=st.booleans())
        def delete_manifest(self, repo: int, i: int, present: bool) -> None:
            """By digest: 202 and gone with every tag on it, here only; 404 if not here."""
            name = self.repos[repo]
            known = sorted(self.manifests[name] if present else ()) or sorted(self.mbytes)
            md = known[i % len(known)]
            r = self.req("DELETE", f"/v2/{name}/manifests/{md}")
            if md in self.manifests[name]:
                assert r.status_code == 202, r.text
                self.manifests[name].discard(md)
                for t in [t for t, x in self.tags[name].items() if x == md]:
                    del self.tags[name][t]
                    self.check_manifest(name, t, "HEAD")
            else:
                assert r.status_code == 404, r.text
                assert self.codes(r) in (["MANIFEST_UNKNOWN"], ["NAME_UNKNOWN"]), r.text
            self.check_manifest(name, md, "GET")

        @precondition(lambda self: self.mbytes)
        @rule(repo=REPO, i=st.integers(0, 30))
        def manifest_digest_as_blob(self, repo: int, i: int) -> None:
            """A manifest's digest on the blobs endpoint: its bytes or 404, never a 5xx; and
            404 in a repository it is not in."""
            name = self.repos[repo]
            md = sorted(self.mbytes)[i % len(self.mbytes)]
            r = self.req("GET", f"/v2/{name}/blobs/{md}")
            if md in self.manifests[name] or self.readable(name, md):
                assert r.status_code in (200, 404), r.status_code
                if r.status_code == 200:
                    assert r.content == self.mbytes[md]
            else:
                assert r.status_code == 404, r.status_code

        @rule(
            repo=REPO,
            i=st.integers(0, 30),
            filtered=st.sampled_from([None, CONFIG_TYPE, "application/x"]),
            present=st.booleans(),
        )
        def referrers(self, repo: int, i: int, filtered: str | None, present: bool) -> None:
            """The manifests here whose subject is the digest, as descriptors with their size,
            media type, artifactType (the config's media type) and annotations; with an
            artifactType filter either applied (OCI-Filters-Applied) or not."""
            name = self.repos[repo]
            cands = sorted(set(self.msubject.values())) if present else []
            cands = cands or [*sorted(self.mbytes), NO_MANIFEST]
            d = cands[i % len(cands)]
            params = {"artifactType": filtered} if filtered else None
            r = self.req("GET", f"/v2/{name}/referrers/{d}", params=params)
            assert r.status_code == 200, r.text
            assert r.headers["Content-Type"].split(";")[0] == "application/vnd.oci.image.index.v1+json"
            idx = r.json()
            assert idx["schemaVersion"] == 2 and idx["mediaType"] == "application/vnd.oci.image.index.v1+json"
            want = {m for m in self.manifests[name] if self.msubject.get(m) == d}
            if filtered and "artifactType" in r.headers.get("OCI-Filters-Applied", ""):
                want = {m for m in want if filtered == CONFIG_TYPE}
            got = {x["digest"]: x for x in idx["manifests"]}
            assert set(got) == want and len(got) == len(idx["manifests"]), (sorted(got), sorted(want))
            for m, desc in got.items():
                assert desc["size"] == len(self.mbytes[m]) and desc["mediaType"] == OCI_MANIFEST, desc
                assert desc["artifactType"] == CONFIG_TYPE, desc
                assert desc.get("annotations") == json.loads(self.mbytes[m]).get("annotations"), desc

        @rule(repo=REPO, n=st.integers(0, 6), last=st.none() | st.sampled_from([*TAGS, "m", "0"]))
        def list_tags_page(self, repo: int, n: int, last: str | None) -> None:
            """`n` tags after `last`: exactly the next n, fewer only when there are not that many
            or with a Link (rel="next") to the rest, which then continues the list; n=0: none
            and no Link."""
            name = self.repos[repo]
            params: dict[str, Any] = {"n": n}
            if last is not None:
                params["last"] = last
            r = self.req("GET", f"/v2/{name}/tags/list", params=params)
            if r.status_code == 404 and not self.has_content(name):
                assert self.codes(r) == ["NAME_UNKNOWN"]
                return
            assert r.status_code == 200, r.text
            tags = r.json()["tags"]
            link = r.headers.get("Link")
            if n == 0:
                assert tags == [] and link is None, (tags, link)
                return
            orders = [(sorted(self.tags[name]), str), (sorted(self.tags[name], key=str.lower), str.lower)]
            afters = [[t for t in o if last is None or key(t) > key(last)] for o, key in orders]
            if link is None:
                assert tags in [a[:n] for a in afters], (tags, afters)
                return
            # a shorter page is allowed with a Link; the Link must lead on from its last tag
            assert 0 < len(tags) <= n and any(tags == a[: len(tags)] for a in afters), (tags, afters)
            after = next(a for a in afters if tags == a[: len(tags)])
            m = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link)
            assert m is not None, link
            nxt = self.req("GET", m.group(1))
            assert nxt.status_code == 200, nxt.text
            rest = nxt.json()["tags"]
            assert rest == after[len(tags) : len(tags) + len(rest)] and rest, (rest, after)

    return RegistryMachine


#: Shrinking replays whole examples against the server, and a failure can take hypothesis' full
#: five minutes to shrink; off unless asked for. Every request of the failing example is printed
#: (hypothesis.note) with what came back, which is the reproduction.
SHRINK = os.environ.get("CLAWSTORE_STATEFUL_SHRINK") == "1"


def test_registry_state_machine(registry: Registry) -> None:
    """About 17 s on local + SQLite, 32 s on moto S3 + PostgreSQL (2 cores), when it passes."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])]
    run_state_machine_as_test(
        make_machine(registry),
        settings=settings(
            max_examples=60 if registry.kind == "local-sqlite" else 30,
            stateful_step_count=50,
            deadline=None,
            phases=phases,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
