"""Packaging details pyproject.toml cannot say: templates/ ships inside the package.

The top-level templates/ folder stays the one place templates are edited; building a
wheel copies it into the package as `formrules/templates/` (found by
`formrules.web.template_folder`). Editable installs keep reading templates/ in place, and
keep their plain .pth file (a package-dir mapping would need setuptools' import finder).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithTemplates(build_py):
    """build_py, plus templates/ copied to formrules/templates in the build."""

    def run(self) -> None:
        """Build the package, then add the templates (not for editable installs)."""
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(HERE / "templates", Path(self.build_lib) / "formrules" / "templates",
                            dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithTemplates})
