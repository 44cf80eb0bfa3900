"""
Container images built offline, in Python: an OCI image layout directory
(C{oci-layout}, C{index.json}, C{blobs/sha256/}) holding gzip'd tar layers of
random bytes, their configs and manifests, in Docker schema2 or OCI media
types, and manifest lists or OCI indexes over them.

Layers are streamed to disk, hashed as the bytes pass (the compressed digest
and the C{diff_id} of the tar inside), so an image of any size costs a few
MiB of memory.  Manifests and configs are canonical JSON, so the same inputs
give the same digests.

Pushing a layout to a registry is L{dragonfly.devtools.registry.push}'s job.
"""

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MIB = 1 << 20

# Media types -----------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# format -> (manifest, config, layer, list or index) media types
MEDIA_TYPES = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX),
}

# Every manifest type a client may ask for, for fetching manifests by hand.
ACCEPT_ALL = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX))

REF_NAME = "org.opencontainers.image.ref.name"


# Digests ---------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    """
    The C{sha256:HEX} digest of C{data}.
    """
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """
    The C{sha256:HEX} digest of the file at C{path}, read in 4 MiB blocks.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    """
    C{value} as compact JSON with sorted keys: the same value, the same bytes.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def random_hex() -> str:
    """
    Eight random bytes in hex: a label that makes an image unique.
    """
    return os.urandom(8).hex()


# What an image is made of ----------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """
    A content-addressed blob of an image layout.
    """

    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """
        The OCI descriptor of this blob, with C{extra} fields
        (C{platform}, C{annotations}).
        """
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            **extra,
        }


@dataclass(frozen=True)
class Layer(Blob):
    """
    A gzip'd tar layer: C{digest} is of the compressed blob, C{diff_id} of
    the tar inside.
    """

    diff_id: str = ""


@dataclass(frozen=True)
class Image:
    """
    One image: its manifest, config and layers, for one platform.
    """

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    architecture: str
    os: str
    format: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def size(self) -> int:
        """
        The compressed size of the layers: what a pull transfers, bar the
        manifest and config.
        """
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ImageIndex:
    """
    A Docker manifest list or an OCI image index over L{Image}s.
    """

    manifest: Blob
    images: tuple[Image, ...]
    format: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def for_platform(
        self, architecture: str = "amd64", os_name: str = "linux"
    ) -> Image:
        for image in self.images:
            if (image.architecture, image.os) == (architecture, os_name):
                return image
        raise KeyError((architecture, os_name))


# Streams ---------------------------------------------------------------------


class _Writable(Protocol):
    def write(self, data: memoryview, /) -> object: ...


class _HashingWriter(io.RawIOBase):
    """
    Passes writes on to C{target} while hashing and counting them.
    """

    def __init__(self, target: _Writable) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: "ReadableBuffer", /) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        self.target.write(view)
        return len(view)


class _RandomReader(io.RawIOBase):
    """
    C{size} pseudo-random bytes, at most 4 MiB per read: from C{seed} (the
    same bytes every time) or from C{os.urandom}.
    """

    def __init__(self, size: int, seed: int | str | None) -> None:
        self.left = size
        self.rng = None if seed is None else random.Random(str(seed))

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        n = min(n, 4 * MIB)
        self.left -= n
        return os.urandom(n) if self.rng is None else self.rng.randbytes(n)


# The layout ------------------------------------------------------------------


class ImageLayout:
    """
    An OCI image layout directory built offline.

    Manifests are written as given (Docker schema2 media types as well as
    OCI ones).  skopeo 1.9's C{oci:} transport only reads OCI-typed
    manifests, so L{dir_view} offers any image or list as a C{dir:}
    transport directory, which skopeo copies byte for byte.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.refs: dict[str, Blob] = {}
        self._write_index()
        self.count = 0

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.split(":", 1)[1]

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        digest = digest_of(data)
        self.blob_path(digest).write_bytes(data)
        return Blob(digest, len(data), media_type)

    def add_json(self, value: Any, media_type: str) -> Blob:
        return self.add_blob(canonical_json(value), media_type)

    def make_layer(
        self,
        size: int,
        *,
        seed: int | str | None = None,
        media_type: str = DOCKER_LAYER,
        compresslevel: int = 0,
    ) -> Layer:
        """
        A gzip'd tar layer holding one file of C{size} random bytes (from
        C{seed}, to make the same layer again, or fresh ones).  The
        default gzip level 0 (stored blocks) is valid gzip and costs
        nothing: random bytes don't compress anyway.
        """
        self.count += 1
        tmp = self.path / f"layer-{self.count}.tmp"
        name = f"dfly/{seed if seed is not None else random_hex()}.bin"
        with tmp.open("wb") as out:
            compressed = _HashingWriter(out)
            with gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=compressed,
                compresslevel=compresslevel,
                mtime=0,
            ) as gz:
                uncompressed = _HashingWriter(gz)
                with tarfile.open(
                    fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT
                ) as tar:
                    directory = tarfile.TarInfo("dfly")
                    directory.type = tarfile.DIRTYPE
                    directory.mode = 0o755
                    tar.addfile(directory)
                    info = tarfile.TarInfo(name)
                    info.size = size
                    info.mode = 0o644
                    tar.addfile(info, _RandomReader(size, seed))
        digest = "sha256:" + compressed.hash.hexdigest()
        tmp.rename(self.blob_path(digest))
        return Layer(
            digest,
            compressed.size,
            media_type,
            diff_id="sha256:" + uncompressed.hash.hexdigest(),
        )

    def make_image(
        self,
        layer_sizes: Sequence[int] = (),
        *,
        format: str = "docker",
        architecture: str = "amd64",
        os_name: str = "linux",
        seeds: Sequence[int | str | None] | None = None,
        layers: Sequence[Layer] = (),
        label: str | None = None,
    ) -> Image:
        """
        An image of C{layers} (already made, e.g. shared with another image)
        followed by new layers of C{layer_sizes} bytes (random, or from
        C{seeds}); C{format} is C{docker} (schema2) or C{oci}.  C{label}
        (random by default) goes into the config, so that two images of
        the same layers still differ.
        """
        manifest_type, config_type, layer_type, _ = MEDIA_TYPES[format]
        if seeds is None:
            seeds = [None] * len(layer_sizes)
        if len(seeds) != len(layer_sizes):
            raise ValueError("one seed per layer size")
        all_layers = [
            Layer(lr.digest, lr.size, layer_type, lr.diff_id) for lr in layers
        ]
        all_layers += [
            self.make_layer(size, seed=seed, media_type=layer_type)
            for size, seed in zip(layer_sizes, seeds, strict=True)
        ]
        created = "2024-01-01T00:00:00Z"
        config = self.add_json(
            {
                "architecture": architecture,
                "os": os_name,
                "created": created,
                "config": {
                    "Cmd": ["/dfly/none"],
                    "Labels": {"dragonfly.test": label or random_hex()},
                },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [layer.diff_id for layer in all_layers],
                },
                "history": [
                    {"created": created, "created_by": f"dragonfly test layer {i}"}
                    for i in range(len(all_layers))
                ],
            },
            config_type,
        )
        manifest = self.add_json(
            {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in all_layers],
            },
            manifest_type,
        )
        return Image(manifest, config, tuple(all_layers), architecture, os_name, format)

    def make_index(
        self, images: Sequence[Image], *, format: str = "docker"
    ) -> ImageIndex:
        """
        A manifest list (C{docker}) or an OCI index (C{oci}) of C{images}.
        """
        list_type = MEDIA_TYPES[format][3]
        manifest = self.add_json(
            {
                "schemaVersion": 2,
                "mediaType": list_type,
                "manifests": [
                    image.manifest.descriptor(
                        platform={"architecture": image.architecture, "os": image.os}
                    )
                    for image in images
                ],
            },
            list_type,
        )
        return ImageIndex(manifest, tuple(images), format)

    def tag(self, name: str, target: Image | ImageIndex) -> None:
        """
        Name C{target} C{name} in C{index.json}.
        """
        self.refs[name] = target.manifest
        self._write_index()

    def dir_view(self, target: Image | ImageIndex) -> Path:
        """
        A C{dir:} transport directory of C{target} (its manifest, the
        manifests of a list's images, configs and layers), hard links into
        this layout.
        """
        view = self.path / "dir" / target.digest.split(":", 1)[1]
        if view.exists():
            return view
        tmp = view.with_name(view.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "version").write_text("Directory Transport Version: 1.1\n")
        shutil.copyfile(self.blob_path(target.digest), tmp / "manifest.json")
        images = target.images if isinstance(target, ImageIndex) else (target,)
        for image in images:
            if image is not target:
                hex_digest = image.digest.split(":", 1)[1]
                os.link(
                    self.blob_path(image.digest), tmp / f"{hex_digest}.manifest.json"
                )
            for blob in (image.config, *image.layers):
                link = tmp / blob.digest.split(":", 1)[1]
                if not link.exists():
                    os.link(self.blob_path(blob.digest), link)
        tmp.rename(view)
        return view

    def _write_index(self) -> None:
        index = {
            "schemaVersion": 2,
            "manifests": [
                blob.descriptor(annotations={REF_NAME: name})
                for name, blob in sorted(self.refs.items())
            ],
        }
        (self.path / "index.json").write_bytes(canonical_json(index))
