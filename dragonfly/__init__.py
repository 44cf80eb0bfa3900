"""
Dragonfly on Twisted: peer-to-peer distribution of files and container images.

A supernode fetches each file from its source once, cuts it into pieces with a
trusted sha256 each, and tells every peer which pieces to fetch from which
other peer.  Peers (the C{dfget} command and the C{dfpeer} daemon) move pieces
among themselves over the piece protocol in L{dragonfly.wire}.
"""

__version__ = "0.1.0"
