"""Repository, tag and reference names per the OCI distribution grammar.

Every name is validated here before any backend turns it into a path or key, so that nothing
outside the grammar (``..``, absolute paths, NUL, upper case) can reach the filesystem or S3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clawstore.digest import Digest
from clawstore.errors import InvalidDigestError, InvalidNameError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_REPOSITORY_LENGTH = 255


def validate_repository(repo: str) -> str:
    if not isinstance(repo, str) or not repo:
        raise InvalidNameError("repository name must be a non-empty string")
    if len(repo) > MAX_REPOSITORY_LENGTH:
        raise InvalidNameError(f"repository name longer than {MAX_REPOSITORY_LENGTH} characters")
    if not REPOSITORY_RE.fullmatch(repo):
        raise InvalidNameError(
            f"invalid repository name {repo!r}: lowercase alphanumeric components separated by "
            "'/', with '.', '_', '__' or '-' inside a component"
        )
    return repo


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise InvalidNameError(f"invalid tag {tag!r}: [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """`repo:tag` or `repo@digest`."""

    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, default_tag: str | None = None) -> Reference:
        if not isinstance(text, str) or not text:
            raise InvalidNameError("reference must be a non-empty string")
        if "@" in text:
            repo, _, dig = text.partition("@")
            try:
                return cls(validate_repository(repo), None, Digest.parse(dig))
            except InvalidDigestError as e:
                raise InvalidNameError(f"invalid reference {text!r}: {e}") from None
        repo, sep, tag = text.rpartition(":")
        if not sep or "/" in tag:
            repo, tag = text, default_tag or ""
            if not tag:
                raise InvalidNameError(f"reference {text!r} needs a tag: REPO:TAG")
        return cls(validate_repository(repo), validate_tag(tag), None)

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"
