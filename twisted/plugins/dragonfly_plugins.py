from twisted.application.service import ServiceMaker

supernode = ServiceMaker(
    "supernode",
    "dragonfly.supernode.tap",
    "Dragonfly supernode: P2P scheduler and CDN for files and image layers.",
    "supernode",
)
dfpeer = ServiceMaker(
    "dfpeer",
    "dragonfly.peer.tap",
    "Dragonfly peer daemon: serves pieces and downloads through the swarm.",
    "dfpeer",
)
