"""The agent-exec test suite: ``python3 -m unittest`` from the repository root.

Discovery of this package runs its modules side by side (see _parallel.py).
"""

import os


def load_tests(loader, standard_tests, pattern):
    from tests._parallel import parallel_suite

    here = os.path.dirname(os.path.abspath(__file__))
    top = os.path.dirname(here)
    standard_tests.addTests(
        loader.discover(start_dir=here, pattern=pattern or "test*.py", top_level_dir=top)
    )
    return parallel_suite(loader, standard_tests)
