"""
C{python -m dragonfly.bench}: the same as the C{dfbench} console script.
"""

from dragonfly.bench.cli import main

main()
