"""The one compiled part: checkpoint/_streamcopy.c, the staging copy with streaming stores
(everything else is in pyproject.toml). Optional: without a C compiler the install still
succeeds, and staging uses torch's copy (``checkpoint.staging.STREAMING`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("checkpoint._streamcopy", ["checkpoint/_streamcopy.c"], optional=True)])
