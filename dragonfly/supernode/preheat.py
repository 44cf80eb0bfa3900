"""
Preheat: fill the supernode's cache before a rollout, so that the first
peers are served from the CDN instead of each waiting on the source.

Design
======
  - A preheat is a list of ordinary tasks.  Each goes through
    L{Supernode.open_task}, the same path a peer's registration takes, so a
    preheated file is the very task a later C{dfget} of that URL (or a
    dfpeer mirror's pull of that blob) joins: same task id, same cache
    entry, no second fetch from the source.
  - A file preheat is one task: the URL, its headers, and the optional
    digest and identifier that make up its task id.
  - An image preheat reads the manifest from the registry (asking for the
    OCI and Docker schema 2 types, single-platform and lists), expands an
    index into its platform manifests (all of them, or those named in
    C{platforms}), each checked against its digest, and makes one task per
    distinct blob (configs and layers), named by the digest alone exactly as
    dfpeer's mirror names a blob pull.  Registry auth is the user's
    C{Authorization} as given, or, when the registry answers 401 with a
    Bearer challenge, a pull token from its realm
    (L{dragonfly.registry_auth}); the tasks carry what worked.
  - Failures are results: a preheat ends C{success} or C{failed} with an
    error code (C{unauthorized}, C{not_found}, C{bad_manifest},
    C{no_platform}, C{too_many_blobs}, C{source}, C{timeout}, C{stopped})
    and each task keeps its own error.  Only a malformed request is refused
    up front (L{InvalidRequest}, a 400 for the API).
  - Everything is bounded: manifest bodies (L{MAX_MANIFEST}), blobs and
    platform manifests per preheat, preheats running at once (more are
    refused with L{PreheatBusy}), source fetches started by preheats at
    once (the others queue), the history kept for C{GET}, and every request
    and wait has a timeout on the injected reactor.
"""

import hashlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    FirstError,
    gatherResults,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dragonfly.http import read_bounded
from dragonfly.registry_auth import (
    TokenError,
    bearer_challenge,
    pull_scope,
    request_token,
)
from dragonfly.supernode.cdn import ContentMismatch, SourceError
from dragonfly.supernode.service import Supernode
from dragonfly.supernode.state import TaskInfo, TaskStatus
from dragonfly.tasks import InvalidRequest, check_digest, check_url, task_id_for

MIB = 1 << 20
MAX_MANIFEST = 4 * MIB
MAX_ERROR_BODY = 64 * 1024
MAX_BLOBS = 256
MAX_PLATFORMS = 64
MAX_ACTIVE = 16
MAX_FETCHES = 4
MAX_HISTORY = 100
REQUEST_TIMEOUT = 30.0
TASK_TIMEOUT = 3600.0

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

DOCKER_HUB = "registry-1.docker.io"

# The distribution spec's repository name, tag and digest grammars (digests:
# sha256 only, the one algorithm task ids are made of).
_NAME = (
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
_MANIFEST_PATH = re.compile(rf"^/v2/(?P<name>{_NAME})/manifests/(?P<ref>[^/]+)$")
_IMAGE_PATH = re.compile(
    rf"^(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>[^@/]+))?$"
)
_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$")


_T = TypeVar("_T")


class PreheatBusy(Exception):
    """
    Too many preheats are running; try again later.
    """


class _Failed(Exception):
    """
    A preheat cannot go on: C{code} says why, for machines.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Requests --------------------------------------------------------------------


@dataclass
class ImageRef:
    """
    Where an image's manifest is: C{base} (C{scheme://host[:port]}), the
    repository C{name} and the tag or digest C{reference}.
    """

    base: str
    name: str
    reference: str

    @property
    def manifest_url(self) -> str:
        return f"{self.base}/v2/{self.name}/manifests/{self.reference}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/v2/{self.name}/blobs/{digest}"


@dataclass
class PreheatRequest:
    """
    A validated preheat request.
    """

    type: str
    url: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""
    identifier: str = ""
    image: ImageRef | None = None
    platforms: list[str] = field(default_factory=list)


def _optional(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise InvalidRequest(f"field {name!r} must be of type {kind.__name__}")
    return value


def _reference(text: str) -> str:
    if text.startswith("sha256:"):
        return check_digest(text)
    if ":" in text or "@" in text:
        raise InvalidRequest(f"digest must be sha256:<64 hex digits>, got {text!r}")
    if not re.fullmatch(_TAG, text):
        raise InvalidRequest(f"bad tag {text!r}")
    return text


def image_from_url(url: str) -> ImageRef:
    """
    The image a C{http(s)://registry/v2/<name>/manifests/<ref>} URL names.

    @raise InvalidRequest: when it is not such a URL.
    """
    check_url(url)
    parts = urlsplit(url)
    match = _MANIFEST_PATH.match(parts.path)
    if match is None or parts.query or parts.fragment:
        raise InvalidRequest(
            f"an image URL must be http(s)://REGISTRY/v2/NAME/manifests/"
            f"TAG-OR-DIGEST, got {url!r}"
        )
    return ImageRef(
        f"{parts.scheme}://{parts.netloc}", match["name"], _reference(match["ref"])
    )


def image_from_reference(text: str, scheme: str = "https") -> ImageRef:
    """
    The image a reference such as C{127.0.0.1:5000/library/demo:latest},
    C{registry.example/app@sha256:...} or C{alpine:3} names.  As in
    Docker, a first part with a dot or a port (or C{localhost}) is the
    registry; without one the image is on Docker Hub, whose one-part names
    are under C{library/}.

    @raise InvalidRequest: on a malformed reference.
    """
    if scheme not in ("http", "https"):
        raise InvalidRequest(f"registry_scheme must be http or https, not {scheme!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, text
    match = _IMAGE_PATH.match(path)
    if match is None:
        raise InvalidRequest(
            f"malformed image reference {text!r} (want [REGISTRY/]NAME[:TAG][@DIGEST])"
        )
    name = match["name"]
    if host == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    digest = match["digest"]
    reference = _reference(digest) if digest is not None else (match["tag"] or "latest")
    base = f"{scheme}://{host}"
    check_url(base)
    return ImageRef(base, name, reference)


def parse_request(
    body: dict[str, Any], headers: dict[str, list[str]]
) -> PreheatRequest:
    """
    Check a preheat request's JSON body (its C{headers} already parsed).

    @raise InvalidRequest: saying what is wrong.
    """
    kind = _optional(body, "type", str, "")
    if kind not in ("file", "image"):
        raise InvalidRequest(f"type must be 'file' or 'image', not {kind!r}")
    url = _optional(body, "url", str, "")
    if kind == "file":
        if not url:
            raise InvalidRequest("missing field 'url'")
        check_url(url)
        digest = _optional(body, "digest", str, "")
        if digest:
            check_digest(digest)
        return PreheatRequest(
            "file",
            url,
            headers,
            digest=digest,
            identifier=_optional(body, "identifier", str, ""),
        )
    reference = _optional(body, "image", str, "")
    if url and reference:
        raise InvalidRequest("give either 'url' or 'image', not both")
    if url:
        image = image_from_url(url)
    elif reference:
        image = image_from_reference(
            reference, _optional(body, "registry_scheme", str, "https")
        )
    else:
        raise InvalidRequest("missing field 'url' (or 'image')")
    platforms = _optional(body, "platforms", list, [])
    for platform in platforms:
        if not isinstance(platform, str) or not _PLATFORM.match(platform):
            raise InvalidRequest(
                f"platforms must be OS/ARCH[/VARIANT] strings, got {platform!r}"
            )
    return PreheatRequest(
        "image", image.manifest_url, headers, image=image, platforms=platforms
    )


# Records ---------------------------------------------------------------------


@dataclass
class PreheatTask:
    """
    One file of a preheat, and how its fetch went.
    """

    url: str
    task_id: str
    digest: str = ""
    kind: str = "file"
    platform: str = ""
    state: str = "pending"
    bytes: int = 0
    size: int | None = None
    error: str = ""
    source_status: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "digest": self.digest,
            "task_id": self.task_id,
            "kind": self.kind,
            "platform": self.platform,
            "state": self.state,
            "bytes": self.bytes,
            "size": self.size,
            "error": self.error or None,
            "source_status": self.source_status or None,
        }


@dataclass
class Preheat:
    """
    One preheat: what was asked, its tasks, and where it stands.
    """

    id: str
    request: PreheatRequest
    created: float
    state: str = "pending"
    tasks: list[PreheatTask] = field(default_factory=list)
    manifests: list[dict[str, str]] = field(default_factory=list)
    error: dict[str, str] | None = None
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("pending", "running")

    def fail(self, code: str, message: str, now: float) -> None:
        self.state = "failed"
        self.error = {"code": code, "message": message}
        self.finished = now

    def summary(self) -> dict[str, Any]:
        states = [task.state for task in self.tasks]
        sizes = [task.size for task in self.tasks]
        return {
            "id": self.id,
            "type": self.request.type,
            "url": self.request.url,
            "platforms": self.request.platforms,
            "state": self.state,
            "error": self.error,
            "created": self.created,
            "finished": self.finished,
            "progress": {
                "tasks": len(self.tasks),
                "success": states.count("success"),
                "failed": states.count("failed"),
                "bytes": sum(task.bytes for task in self.tasks),
                "size": None if None in sizes else sum(s or 0 for s in sizes),
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "manifests": self.manifests,
            "tasks": [task.to_json() for task in self.tasks],
        }


# The preheater ---------------------------------------------------------------


class Preheater:
    """
    Runs preheats on a L{Supernode} and keeps a bounded history of them.
    """

    _log = Logger()

    def __init__(
        self,
        supernode: Supernode,
        *,
        max_active: int = MAX_ACTIVE,
        max_fetches: int = MAX_FETCHES,
        max_history: int = MAX_HISTORY,
        max_blobs: int = MAX_BLOBS,
        request_timeout: float = REQUEST_TIMEOUT,
        task_timeout: float = TASK_TIMEOUT,
    ) -> None:
        self._supernode = supernode
        self._reactor = supernode.reactor
        self._http = supernode.http
        self._max_active = max_active
        self._max_history = max(max_history, max_active)
        self._max_blobs = max_blobs
        self._request_timeout = request_timeout
        self._task_timeout = task_timeout
        self._fetch_slots = DeferredSemaphore(max_fetches)
        self._preheats: OrderedDict[str, Preheat] = OrderedDict()
        self._running: dict[str, Deferred[None]] = {}
        supernode.on_stop(self.stop)

    def start(self, request: PreheatRequest) -> Preheat:
        """
        Record a preheat and start it.

        @raise PreheatBusy: when L{MAX_ACTIVE} preheats are running already.
        """
        if len(self._running) >= self._max_active:
            raise PreheatBusy(
                f"{len(self._running)} preheats are running; try again later"
            )
        preheat = Preheat(secrets.token_hex(8), request, self._reactor.seconds())
        self._preheats[preheat.id] = preheat
        self._trim()
        self._log.info(
            "preheat {id} of {type} {url} started",
            id=preheat.id,
            type=request.type,
            url=request.url,
        )
        d = Deferred.fromCoroutine(self._run(preheat))
        if not d.called:
            self._running[preheat.id] = d
            d.addBoth(self._ended, preheat.id)
        return preheat

    def _ended(self, result: object, preheat_id: str) -> None:
        self._running.pop(preheat_id, None)
        if isinstance(result, Failure) and not result.check(CancelledError):
            self._log.failure("preheat {id} crashed", result, id=preheat_id)

    def _trim(self) -> None:
        """
        Forget the oldest finished preheats beyond the history's size.
        """
        excess = len(self._preheats) - self._max_history
        for preheat_id in list(self._preheats):
            if excess <= 0:
                break
            if not self._preheats[preheat_id].active:
                del self._preheats[preheat_id]
                excess -= 1

    def get(self, preheat_id: str) -> Preheat | None:
        return self._preheats.get(preheat_id)

    def recent(self) -> list[Preheat]:
        """
        The preheats in the history, newest first.
        """
        return list(reversed(self._preheats.values()))

    async def refresh(self, preheat: Preheat) -> None:
        """
        Bring the byte counts of a preheat's running tasks up to date from
        the swarm state (they are settled when a task ends).
        """
        for task in preheat.tasks:
            if task.state != "running":
                continue
            swarm = await self._supernode.state.get(task.task_id)
            if swarm is not None:
                _count(task, swarm.task)

    def stop(self) -> None:
        for d in list(self._running.values()):
            d.cancel()

    # Running ----------------------------------------------------------------

    async def _run(self, preheat: Preheat) -> None:
        request = preheat.request
        preheat.state = "running"
        try:
            if request.type == "file":
                preheat.tasks = [
                    PreheatTask(
                        request.url,
                        task_id_for(
                            request.url, (), request.digest, request.identifier
                        ),
                        request.digest,
                    )
                ]
                headers = request.headers
            else:
                headers = await self._expand_image(preheat)
            await self._fetch_all(preheat, headers)
        except _Failed as e:
            preheat.fail(e.code, e.message, self._reactor.seconds())
        except CancelledError:
            preheat.fail("stopped", "the supernode stopped", self._reactor.seconds())
            for task in preheat.tasks:
                if task.state in ("pending", "running"):
                    task.state = "failed"
                    task.error = "the supernode stopped"
            return
        except Exception as e:
            self._log.failure("preheat {id} failed", id=preheat.id)
            preheat.fail("internal", str(e), self._reactor.seconds())
        else:
            failed = [task for task in preheat.tasks if task.state != "success"]
            if failed:
                preheat.fail(
                    "source",
                    f"{len(failed)} of {len(preheat.tasks)} files failed; "
                    f"first: {failed[0].url}: {failed[0].error}",
                    self._reactor.seconds(),
                )
            else:
                preheat.state = "success"
                preheat.finished = self._reactor.seconds()
        self._log.info(
            "preheat {id} ended: {state}{error}",
            id=preheat.id,
            state=preheat.state,
            error=f" ({preheat.error['message']})" if preheat.error else "",
        )

    async def _fetch_all(self, preheat: Preheat, headers: dict[str, list[str]]) -> None:
        fetches = [
            Deferred.fromCoroutine(self._fetch(preheat, task, headers))
            for task in preheat.tasks
        ]
        try:
            await gatherResults(fetches, consumeErrors=True)
        except BaseException as e:
            for d in fetches:
                d.cancel()
            if isinstance(e, FirstError):
                # The first fetch's own error (a cancellation, at a stop).
                e.subFailure.raiseException()
            raise

    async def _fetch(
        self, preheat: Preheat, task: PreheatTask, headers: dict[str, list[str]]
    ) -> None:
        """
        Fetch one task into the cache, recording the outcome on C{task}.
        """
        await self._fetch_slots.acquire()
        try:
            task.state = "running"
            try:
                swarm = await self._supernode.open_task(
                    task.url, headers, task.digest, preheat.request.identifier
                )
            except ContentMismatch as e:
                task.state, task.error = "failed", str(e)
                return
            except SourceError as e:
                task.state, task.error = "failed", str(e)
                task.source_status = e.status
                return
            except (InvalidRequest, OSError) as e:
                task.state, task.error = "failed", str(e)
                return
            info = await self._supernode.wait_fetched(
                swarm.task.task_id, self._task_timeout
            )
            if info is None:
                task.state, task.error = "failed", "the supernode dropped the task"
                return
            _count(task, info)
            if info.status is TaskStatus.DONE:
                task.state = "success"
            elif info.status is TaskStatus.FAILED:
                task.state, task.error = "failed", info.error
                task.source_status = info.source_status
            else:
                task.state = "failed"
                task.error = f"not cached within {self._task_timeout:g}s"
        finally:
            self._fetch_slots.release()

    # Images ------------------------------------------------------------------

    async def _expand_image(self, preheat: Preheat) -> dict[str, list[str]]:
        """
        Read the image's manifest (and its platforms' manifests) and make
        the preheat's tasks; return the headers the blob fetches need.
        """
        request = preheat.request
        image = request.image
        assert image is not None
        auth = _Auth(request.headers)
        media_type, body = await self._manifest(image, image.reference, auth)
        if media_type in INDEX_TYPES:
            chosen = self._platforms(body, request.platforms)
            manifests = []
            for platform, digest in chosen:
                sub_type, sub = await self._manifest(image, digest, auth)
                if sub_type not in MANIFEST_TYPES:
                    raise _Failed(
                        "bad_manifest",
                        f"{digest} ({platform}) is a {sub_type}, not an image manifest",
                    )
                manifests.append((platform, digest, sub))
        else:
            manifests = [("", image.reference, body)]
        seen: set[str] = set()
        tasks = []
        for platform, digest, manifest in manifests:
            preheat.manifests.append({"digest": digest, "platform": platform})
            for kind, blob in _blobs(manifest, digest):
                if blob in seen:
                    continue
                seen.add(blob)
                url = image.blob_url(blob)
                tasks.append(
                    PreheatTask(
                        url,
                        task_id_for(url, digest=blob),
                        blob,
                        kind=kind,
                        platform=platform,
                    )
                )
        if len(tasks) > self._max_blobs:
            raise _Failed(
                "too_many_blobs",
                f"the image has {len(tasks)} blobs, more than the {self._max_blobs} "
                "a preheat may fetch",
            )
        preheat.tasks = tasks
        return auth.headers()

    def _platforms(
        self, index: dict[str, Any], wanted: list[str]
    ) -> list[tuple[str, str]]:
        """
        The C{(platform, digest)} of the index's image manifests to preheat.
        """
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise _Failed("bad_manifest", "the index has no manifests list")
        chosen = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise _Failed("bad_manifest", "an index entry is not an object")
            media_type = entry.get("mediaType")
            if media_type is not None and media_type not in MANIFEST_TYPES:
                continue
            digest = _descriptor_digest(entry)
            platform = _platform_of(entry.get("platform"))
            if platform.startswith("unknown/"):
                # Build attestations, not something a runtime pulls.
                continue
            if wanted and not any(_matches(platform, w) for w in wanted):
                continue
            chosen.append((platform, digest))
        if not chosen:
            raise _Failed(
                "no_platform",
                "the index has no image for "
                + (", ".join(wanted) if wanted else "any platform"),
            )
        if len(chosen) > MAX_PLATFORMS:
            raise _Failed(
                "too_many_blobs",
                f"the index has {len(chosen)} platform images, more than "
                f"{MAX_PLATFORMS}",
            )
        return chosen

    async def _manifest(
        self, image: ImageRef, reference: str, auth: "_Auth"
    ) -> tuple[str, dict[str, Any]]:
        """
        GET a manifest: its media type and parsed body, checked against
        C{reference} when that is a digest.
        """
        url = f"{image.base}/v2/{image.name}/manifests/{reference}"
        response, raw = await self._registry_get(image, url, auth)
        if response.code == 404:
            raise _Failed("not_found", f"manifest {image.name}:{reference} not found")
        if response.code != 200:
            raise _Failed(
                "source",
                f"registry answered HTTP {response.code} for {url}",
            )
        if reference.startswith("sha256:"):
            actual = "sha256:" + _sha256(raw)
            if actual != reference:
                raise _Failed(
                    "bad_manifest", f"manifest {reference} has digest {actual}"
                )
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise _Failed("bad_manifest", f"manifest at {url} is not JSON") from e
        if not isinstance(body, dict):
            raise _Failed("bad_manifest", f"manifest at {url} is not a JSON object")
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        media_type = body.get("mediaType") or content_type.decode("latin-1")
        media_type = media_type.partition(";")[0].strip()
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            # An OCI document may leave mediaType out: its shape tells.
            if isinstance(body.get("manifests"), list):
                media_type = OCI_INDEX
            elif isinstance(body.get("layers"), list):
                media_type = OCI_MANIFEST
            else:
                raise _Failed(
                    "bad_manifest",
                    f"unsupported manifest type {media_type!r} at {url}",
                )
        return media_type, body

    async def _registry_get(
        self, image: ImageRef, url: str, auth: "_Auth"
    ) -> tuple[IResponse, bytes]:
        """
        GET from the registry with C{auth}, trading a Bearer challenge for a
        pull token once.
        """
        response, raw = await self._get(url, auth.request_headers())
        if response.code == 401 and not auth.token:
            challenge = bearer_challenge(response.headers)
            if challenge:
                try:
                    token = await self._bounded(
                        request_token(
                            self._http,
                            challenge,
                            pull_scope(image.name),
                            timeout=self._request_timeout,
                            authorization=auth.given,
                        )
                    )
                    auth.token = token.value
                except TokenError as e:
                    raise _Failed("unauthorized", str(e)) from e
                response, raw = await self._get(url, auth.request_headers())
        if response.code in (401, 403):
            raise _Failed(
                "unauthorized",
                f"registry answered HTTP {response.code} for {url}"
                + (" with a pull token" if auth.token else ""),
            )
        return response, raw

    async def _get(self, url: str, headers: Headers) -> tuple[IResponse, bytes]:
        async def get() -> tuple[IResponse, bytes]:
            response: IResponse = await self._http.get(
                url, headers=headers, reactor=self._reactor
            )
            limit = MAX_MANIFEST if response.code == 200 else MAX_ERROR_BODY
            try:
                raw = await read_bounded(response, limit)
            except ValueError as e:
                raise _Failed("bad_manifest", f"{url}: {e}") from e
            return response, raw

        return await self._bounded(get())

    async def _bounded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """
        Await the coroutine C{work} for at most the request timeout.
        """
        d: Deferred[_T] = Deferred.fromCoroutine(work)
        d.addTimeout(self._request_timeout, self._reactor)
        try:
            return await d
        except DeferredTimeout as e:
            raise _Failed(
                "timeout",
                f"the registry did not answer within {self._request_timeout:g}s",
            ) from e
        except (_Failed, CancelledError):
            raise
        except Exception as e:
            raise _Failed("source", f"registry: {type(e).__name__}: {e}") from e


class _Auth:
    """
    The headers a preheat sends to a registry: the user's, with the
    C{Authorization} replaced by a pull token once one was fetched.
    """

    def __init__(self, headers: dict[str, list[str]]) -> None:
        self._headers = headers
        self.given = next(
            (v[0] for k, v in headers.items() if k.lower() == "authorization" and v),
            "",
        )
        self.token = ""

    def headers(self) -> dict[str, list[str]]:
        kept = {k: v for k, v in self._headers.items() if k.lower() != "authorization"}
        if self.token:
            kept["Authorization"] = [f"Bearer {self.token}"]
        elif self.given:
            kept["Authorization"] = [self.given]
        return kept

    def request_headers(self) -> Headers:
        headers = Headers({k: list(v) for k, v in self.headers().items()})
        headers.setRawHeaders(b"accept", [ACCEPT.encode()])
        return headers


def _count(task: PreheatTask, info: TaskInfo) -> None:
    task.size = info.length
    cached = len(info.pieces) * info.piece_size
    task.bytes = min(cached, info.length) if info.length is not None else cached


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _descriptor_digest(descriptor: Any) -> str:
    if not isinstance(descriptor, dict):
        raise _Failed("bad_manifest", "a descriptor is not an object")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(_DIGEST, digest):
        raise _Failed(
            "bad_manifest", f"unsupported or malformed digest {digest!r} in a manifest"
        )
    return digest


def _platform_of(platform: Any) -> str:
    if not isinstance(platform, dict):
        return ""
    text = f"{platform.get('os', '')}/{platform.get('architecture', '')}"
    if platform.get("variant"):
        text += f"/{platform['variant']}"
    return text


def _matches(platform: str, wanted: str) -> bool:
    """
    Whether an index entry's C{os/arch[/variant]} is what the user named
    (a name without a variant takes any variant).
    """
    return platform == wanted or (
        wanted.count("/") == 1 and platform.startswith(wanted + "/")
    )


def _blobs(manifest: dict[str, Any], digest: str) -> list[tuple[str, str]]:
    """
    The C{(kind, digest)} of an image manifest's config and layers.
    """
    layers = manifest.get("layers")
    if "config" not in manifest or not isinstance(layers, list):
        raise _Failed("bad_manifest", f"manifest {digest} has no config or layers")
    blobs = [("config", _descriptor_digest(manifest["config"]))]
    blobs += [("layer", _descriptor_digest(layer)) for layer in layers]
    return blobs
