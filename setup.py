"""Packaging details pyproject.toml cannot say: templates/ ships inside the package.

The top-level templates/ folder stays the one place templates are edited; the wheel
carries it as `formrules/templates/` (found by `formrules.web.template_folder`).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["formrules", "formrules.*"]), "formrules.templates"],
    package_dir={"formrules.templates": "templates"},
)
