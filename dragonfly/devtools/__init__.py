"""
Tools for running Dragonfly against real third-party software on loopback:
container images built offline (L{dragonfly.devtools.oci}) and a real
registry with skopeo as its client (L{dragonfly.devtools.registry}).

They serve the local demo (C{python -m dragonfly.demo}) and the test suite
alike; nothing in the daemons imports them.
"""
