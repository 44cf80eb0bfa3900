"""
dfpeer's registry mirror end to end, with real processes on loopback: a
real registry (L{registry_env}) holding images built offline, a supernode
and dfpeers (C{twistd -n dfpeer --registry http://127.0.0.1:PORT}), and real
clients (skopeo, dockerd, containerd's ctr, podman) pulling through a
dfpeer.

What the tests prove, for each client: the image's digests are what was
pushed (the clients check every blob against its digest, and the tests
compare the layer digests with the built image); the layer blobs went
through the swarm (the dfpeer's C{dfclient.log} has C{downloading piece}
records for each layer's task); and the registry sent each layer about
once in all (to the supernode, never to the client directly).

Every process is started through a L{loopback.Processes} tracker and ended
by PID when its test (or this module) ends.
"""

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from loopback import (
    MIB,
    Daemon,
    Processes,
    free_port,
    piece_lines,
    start_dfpeer,
    start_supernode,
)
from registry_env import (
    Image,
    ImageIndex,
    ImageLayout,
    Pulled,
    Registry,
    make_podman,
    push,
    short_dir,
    skopeo_pull,
    start_containerd,
    start_dockerd,
    start_registry,
    write_hosts_dir,
)

from dragonfly.tasks import task_id_for

pytestmark = [pytest.mark.registry, pytest.mark.loopback]

# Client user agents: none of them may fetch a layer from the registry.
CLIENT_AGENTS = ("docker/", "containerd/", "containers/", "skopeo/", "libpod/")
PULL_TIMEOUT = 240.0


@dataclass
class Env:
    registry: Registry
    layout: ImageLayout
    supernode: Daemon
    dfpeer: Daemon
    work: Path
    # name -> (what the tag points at, the linux/amd64 image a pull gets)
    images: dict[str, tuple[Image | ImageIndex, Image]]

    def repository(self, name: str) -> str:
        return f"library/dfly-{name}"

    def ref(self, name: str) -> str:
        return f"{self.repository(name)}:v1"

    def hub_ref(self, name: str) -> str:
        return f"docker.io/{self.ref(name)}"


@pytest.fixture(scope="module")
def module_processes() -> Iterator[Processes]:
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.stop_all()


def start_mirror_peer(
    processes: Processes,
    directory: Path,
    supernode: Daemon,
    registry: str,
    *,
    ip: str = "127.0.0.1",
    extra: tuple[str, ...] = (),
) -> Daemon:
    return start_dfpeer(
        processes,
        directory,
        supernode.node,
        ip=ip,
        extra=["--registry", registry, *extra],
    )


@pytest.fixture(scope="module")
def env(module_processes: Processes, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """
    The registry with one image (or list/index) per test, each with layers
    of its own (so each test sees its layers go through the swarm for the
    first time), a supernode and one dfpeer mirroring the registry.
    """
    work = tmp_path_factory.mktemp("mirror-e2e")
    registry = start_registry(module_processes, work / "registry")
    layout = ImageLayout(work / "layout")
    images: dict[str, tuple[Image | ImageIndex, Image]] = {}
    for name, sizes in {
        "skopeo": [3 * MIB, 2 * MIB + 17],
        "docker": [4 * MIB + 5, 1 * MIB],
        "ctr": [3 * MIB + 1, 1 * MIB + 3],
        "podman": [2 * MIB + 7, 3 * MIB],
        "two": [24 * MIB, 16 * MIB],
        "big": [48 * MIB, 40 * MIB, 16 * MIB, 2 * MIB],
    }.items():
        image = layout.make_image(sizes)
        images[name] = (image, image)
    docker_amd64 = layout.make_image([3 * MIB, 1 * MIB + 9])
    docker_arm64 = layout.make_image([1 * MIB], architecture="arm64")
    images["list"] = (layout.make_index([docker_amd64, docker_arm64]), docker_amd64)
    oci_amd64 = layout.make_image([2 * MIB + 11, 1 * MIB], format="oci")
    oci_arm64 = layout.make_image([1 * MIB], format="oci", architecture="arm64")
    images["oci"] = (
        layout.make_index([oci_amd64, oci_arm64], format="oci"),
        oci_amd64,
    )
    for name, (top, _) in images.items():
        push(layout, "v1", registry, f"library/dfly-{name}", top)
    # The layout's copies are no longer needed (the registry has its own).
    for blob in layout.blobs.iterdir():
        if blob.stat().st_size > MIB:
            blob.unlink()
    supernode = start_supernode(module_processes, work / "supernode")
    dfpeer = start_mirror_peer(
        module_processes, work / "dfpeer", supernode, registry.url
    )
    return Env(registry, layout, supernode, dfpeer, work, images)


# Checks ---------------------------------------------------------------------------


def layer_task(digest: str) -> str:
    return task_id_for("", digest=digest)


def check_p2p(peer: Daemon, image: Image) -> list[dict[str, Any]]:
    """
    The dfpeer's dfclient.log has C{downloading piece} records for each of
    C{image}'s layers, covering the layer: the blob came through the swarm.
    """
    records = piece_lines(peer.home)
    for layer in image.layers:
        mine = [r for r in records if r["taskID"] == layer_task(layer.digest)]
        assert mine, (layer, "no downloading piece record on", peer.home)
        assert sum(r["pieceSize"] for r in mine) >= layer.size, (layer, mine)
    return records


def check_registry_once(
    registry: Registry, mark: int, image: Image, factor: float | None = None
) -> dict[str, int]:
    """
    Since C{mark}, the registry sent each of C{image}'s layers whole at
    least once (to the supernode or a dfpeer going back to source: no
    container client fetched a layer from it directly), and with C{factor},
    at most C{factor} times its size.
    """
    registry.settle(timeout=10.0)
    entries = registry.since(mark)
    sent = registry.blob_bytes(mark)
    for layer in image.layers:
        assert layer.size <= sent.get(layer.digest, 0), (layer, sent)
        if factor is not None:
            assert sent[layer.digest] <= factor * layer.size, (layer, sent)
    direct = [
        e
        for e in entries
        if e.blob in image.layer_digests
        and e.method == "GET"
        and any(agent in e.agent for agent in CLIENT_AGENTS)
    ]
    assert direct == [], direct
    return sent


def http(
    url: str, timeout: float = 30.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes, float]:
    """
    GET C{url}: status, headers, body and the seconds it took.
    """
    started = time.monotonic()
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return (
                r.status,
                {k.lower(): v for k, v in r.headers.items()},
                r.read(),
                time.monotonic() - started,
            )
    except urllib.error.HTTPError as e:
        with e:
            return (
                e.code,
                {k.lower(): v for k, v in e.headers.items()},
                e.read(),
                time.monotonic() - started,
            )


def registry_error_code(body: bytes) -> str:
    errors = json.loads(body)["errors"]
    assert errors and errors[0].get("message"), errors
    return str(errors[0]["code"])


# Pulls through one dfpeer -----------------------------------------------------------


def test_skopeo_pull_through_p2p(env: Env, tmp_path: Path) -> None:
    """
    skopeo copies an image through the dfpeer (registries.conf mirror, as in
    registry_env): every blob matches its digest and the layers are the
    pushed ones; each layer went through the swarm (piece records in the
    dfpeer's dfclient.log) and the registry sent it about once.
    """
    top, image = env.images["skopeo"]
    mark = env.registry.mark()
    pulled = skopeo_pull(
        env.hub_ref("skopeo"), tmp_path, f"{env.dfpeer.ip}:{env.dfpeer.port}"
    )
    pulled.check(image, top)
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)


def test_docker_pull_through_p2p(env: Env, processes: Processes) -> None:
    """
    dockerd with C{registry-mirrors} = the dfpeer pulls the Hub-style name
    C{library/dfly-docker:v1}: the daemon's records match the pushed
    layers, which came through the swarm, sent about once by the registry.
    """
    top, image = env.images["docker"]
    mark = env.registry.mark()
    with short_dir("dfmd") as run_dir:
        daemon = start_dockerd(
            processes,
            env.work / "dockerd",
            run_dir,
            [env.dfpeer.url("")],
        )
        try:
            pulled = daemon.pull(env.ref("docker"), timeout=PULL_TIMEOUT)
        finally:
            daemon.stop()
    pulled.check(image, top)
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)


def test_ctr_pull_through_p2p(env: Env, processes: Processes) -> None:
    """
    containerd (C{ctr images pull --hosts-dir}) with the dfpeer as the
    mirror of the registry's own host: containerd adds C{?ns=127.0.0.1:PORT}
    to every request, which names the dfpeer's C{--registry}.  The content
    store has the pushed blobs; the layers came through the swarm.

    (containerd's C{ns=docker.io} can only select an upstream whose host is
    Docker Hub's, so a Hub-style name cannot reach a local registry: the
    test configures containerd as a user of a private registry would.)
    """
    top, image = env.images["ctr"]
    mark = env.registry.mark()
    reference = f"{env.registry.address}/{env.ref('ctr')}"
    with short_dir("dfmc") as run_dir:
        daemon = start_containerd(processes, env.work / "containerd", run_dir)
        try:
            # The registry's own address as "server" would let containerd
            # fall back to it: a closed port makes the mirror the only way.
            hosts_dir = write_hosts_dir(
                env.work / "containerd",
                env.dfpeer.url(""),
                registry_host=env.registry.address,
                server=f"http://127.0.0.1:{free_port()}",
            )
            pulled = daemon.pull(reference, hosts_dir, timeout=PULL_TIMEOUT)
            pulled.check(image, top)
        finally:
            daemon.stop()
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)
    # The manifests reach the registry forwarded by the dfpeer (with
    # containerd's User-Agent, without its ns); the layers only by the swarm.
    forwarded = [e for e in env.registry.since(mark) if "containerd/" in e.agent]
    assert forwarded and all(e.manifest for e in forwarded), forwarded
    assert not any(e.query for e in forwarded), forwarded


def test_podman_pull_through_p2p(env: Env) -> None:
    """
    podman with a registries.conf mirror (insecure: it tries HTTPS first
    and gets dfpeer's instant 400) pulls C{docker.io/library/dfly-podman}:
    the storage's layer records match the pushed layers, which came through
    the swarm.
    """
    top, image = env.images["podman"]
    mark = env.registry.mark()
    with short_dir("dfmp") as run_dir:
        podman = make_podman(
            env.work / "podman", run_dir, f"{env.dfpeer.ip}:{env.dfpeer.port}"
        )
        try:
            started = time.monotonic()
            pulled = podman.pull(env.hub_ref("podman"), timeout=PULL_TIMEOUT)
            seconds = time.monotonic() - started
            pulled.check(image, top)
        finally:
            podman.stop()
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)
    # The HTTPS attempt is refused at once, not after a TLS timeout (10 s).
    assert seconds < 60, seconds


@pytest.mark.parametrize("name", ["list", "oci"])
def test_list_and_index_pull(env: Env, tmp_path: Path, name: str) -> None:
    """
    A Docker manifest list and an OCI index: skopeo picks the linux/amd64
    instance through the mirror and gets its layers (not the arm64 ones),
    through the swarm.
    """
    top, image = env.images[name]
    assert isinstance(top, ImageIndex)
    mark = env.registry.mark()
    pulled = skopeo_pull(
        env.hub_ref(name), tmp_path, f"{env.dfpeer.ip}:{env.dfpeer.port}"
    )
    pulled.check(image, top)
    arm64 = top.for_platform("arm64")
    assert not set(arm64.layer_digests) & pulled.content
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)


# Two hosts -------------------------------------------------------------------------


def test_two_hosts_pull_the_same_image(
    env: Env, processes: Processes, tmp_path: Path, record_property: Any
) -> None:
    """
    Two hosts (dfpeers on 127.0.0.2 and 127.0.0.3, one supernode), one
    dockerd each with its dfpeer as mirror, pulling the same image at the
    same time: both get it; at least one dfpeer got pieces from the other
    peer (not the supernode's cdnnode); and the registry sent each layer
    about once in all (at most 1.05 times the layers' sizes).
    """
    top, image = env.images["two"]
    peers = [
        start_mirror_peer(
            processes, tmp_path / f"dfpeer-{ip}", env.supernode, env.registry.url, ip=ip
        )
        for ip in ("127.0.0.2", "127.0.0.3")
    ]
    mark = env.registry.mark()
    spans: dict[str, tuple[float, float]] = {}
    with short_dir("dfm2") as run2, short_dir("dfm3") as run3:
        daemons = []
        try:
            for peer, run_dir in zip(peers, (run2, run3), strict=True):
                daemons.append(
                    start_dockerd(
                        processes,
                        tmp_path / f"dockerd-{peer.ip}",
                        run_dir,
                        [peer.url("")],
                    )
                )

            def pull(daemon: Any) -> Pulled:
                started = time.monotonic()
                pulled = daemon.pull(env.ref("two"), timeout=PULL_TIMEOUT)
                spans[daemon.host] = (started, time.monotonic())
                return pulled

            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(pull, daemons))
        finally:
            for daemon in daemons:
                daemon.stop()
    for pulled in results:
        pulled.check(image, top)
    from_peers = {}
    for peer in peers:
        check_p2p(peer, image)
        from_peers[peer.ip] = [
            r
            for r in piece_lines(peer.home)
            if "cdnnode" not in r["dstCid"]
            and r["taskID"] in {layer_task(d) for d in image.layer_digests}
        ]
    sent = check_registry_once(env.registry, mark, image)
    total = sum(sent.get(d, 0) for d in image.layer_digests)
    print(
        f"\ntwo-host pull of {image.size} bytes of layers: the registry sent "
        f"{total} bytes of them ({total / image.size:.3f}x); pieces from the "
        f"other peer: " + ", ".join(f"{ip}: {len(r)}" for ip, r in from_peers.items())
    )
    record_property("two_host_registry_blob_bytes", total)
    record_property("two_host_layer_bytes", image.size)
    assert total <= 1.05 * image.size, (total, image.size)
    assert any(from_peers.values()), (
        "neither dfpeer got a piece from the other peer",
        {ip: len(r) for ip, r in from_peers.items()},
    )


# The big pull -----------------------------------------------------------------------


def test_big_pull_timing(env: Env, tmp_path: Path, record_property: Any) -> None:
    """
    A 100+ MiB image through the dfpeer and straight from the registry
    with skopeo: both correct, the mirrored one through the swarm.  The
    times are printed and recorded, not asserted.
    """
    top, image = env.images["big"]
    assert image.size > 100 * MIB
    mark = env.registry.mark()
    through = skopeo_pull(
        env.hub_ref("big"),
        tmp_path / "through",
        f"{env.dfpeer.ip}:{env.dfpeer.port}",
        timeout=PULL_TIMEOUT,
    )
    through.check(image, top)
    check_p2p(env.dfpeer, image)
    check_registry_once(env.registry, mark, image)
    _drop_big_files(tmp_path / "through")
    direct = skopeo_pull(env.hub_ref("big"), tmp_path / "direct", env.registry.address)
    direct.check(image, top)
    _drop_big_files(tmp_path / "direct")
    print(
        f"\nskopeo pull of {image.size / MIB:.1f} MiB: through dfpeer "
        f"{through.seconds:.2f}s, straight from the registry {direct.seconds:.2f}s"
    )
    record_property("big_pull_mib", round(image.size / MIB, 1))
    record_property("big_pull_through_dfpeer_s", round(through.seconds, 2))
    record_property("big_pull_direct_s", round(direct.seconds, 2))


def _drop_big_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and path.stat().st_size > MIB:
            path.unlink()


# Errors -----------------------------------------------------------------------------


def test_unknown_blob_is_404_quickly(env: Env) -> None:
    """
    A blob the registry does not have: the mirror answers 404
    C{BLOB_UNKNOWN} (the registry's answer to the supernode, carried back),
    within seconds.
    """
    digest = "sha256:" + os.urandom(32).hex()
    status, headers, body, seconds = http(
        env.dfpeer.url(f"/v2/{env.repository('skopeo')}/blobs/{digest}"),
        timeout=20,
    )
    assert status == 404, body
    assert headers["content-type"] == "application/json"
    assert registry_error_code(body) == "BLOB_UNKNOWN"
    assert seconds < 15, seconds


def test_registry_down_is_502_bounded(
    env: Env, processes: Processes, tmp_path: Path
) -> None:
    """
    A dfpeer whose registry is down: C{/v2/}, a manifest and a blob are
    each answered 502 with a registry-style C{UNAVAILABLE} body, without
    hanging.
    """
    dead = f"http://127.0.0.1:{free_port()}"
    peer = start_mirror_peer(processes, tmp_path / "dfpeer", env.supernode, dead)
    for path in (
        "/v2/",
        "/v2/library/dfly-x/manifests/v1",
        "/v2/library/dfly-x/blobs/sha256:" + os.urandom(32).hex(),
    ):
        status, headers, body, seconds = http(peer.url(path), timeout=60)
        assert status == 502, (path, status, body)
        assert headers["content-type"] == "application/json"
        assert registry_error_code(body) == "UNAVAILABLE", (path, body)
        assert seconds < 30, (path, seconds)
