"""
Services the two daemons share.
"""

from twisted.application.internet import StreamServerEndpointService


class RequiredPort(StreamServerEndpointService):
    """
    A listening port the daemon cannot work without: a port already in use
    (or any other listening error) fails the start, so that C{twistd} exits
    with status 1 and the error, instead of logging it and running on
    without the port, which a service manager would report as healthy.
    """

    # Twisted's documented switch for this (the one strports.service sets):
    # listening errors raised from privilegedStartService, not only logged.
    _raiseSynchronously = True
