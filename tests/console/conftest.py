"""The console's tests share the package fixtures of the outputs' tests."""

from tests.outputs.conftest import ct_package, make_package  # noqa: F401
