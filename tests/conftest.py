"""For the whole suite: helper modules whose shared checks use `assert`.

pytest rewrites the asserts of test modules so that a failure shows the values
involved; it does the same for other modules only when told before they are imported,
which is what this does for the helpers listed here.
"""

import pytest

pytest.register_assert_rewrite(
    "tests.engine_harness",
    "tests.served_checkpoint",
    "tests.structured_catalogue",
    "tests.structured_harness",
    "tests.tool_calling_cases",
)
