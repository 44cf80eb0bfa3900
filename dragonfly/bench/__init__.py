"""
C{dfbench}: the benchmarks of issue 6, run as one command.

Each scenario starts everything it needs on loopback addresses (sources,
nginx, a supernode, peers on 127.0.0.N), runs several times, and is compared
with a reference measured in the same run on the same machine: C{curl}
against nginx for the piece protocol, plain downloads from the same capped
source for the swarm.  Only the medians and the ratios mean something on a
small, noisy machine; the absolute figures are there to be read beside them.

Design
======
  - Every process is started by L{common.Processes} and ended by its PID
    (SIGTERM, then SIGKILL after a bounded wait), also when a scenario
    fails or the bench is interrupted.  Every wait is bounded.
  - Nothing here is a unit test: timings belong in C{BENCHMARKS.md}, never
    in C{tests/}, where a slow CI machine would make them flaky.
  - Large files live in a work directory under C{/tmp} and are deleted as
    soon as a repetition is done with them.
  - A scenario that cannot be run honestly (the registry mirror does not
    exist yet) says C{SKIP}, never a made-up C{PASS}.
"""
