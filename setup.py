"""The build step pyproject.toml cannot say: the server's schema, templates and static files go
into the wheel as the folder p3s_server_files beside p3s_server.py, where the installed server
looks for them (in a checkout they sit beside it)."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

SERVER_FILES = ('schema.sql', 'views', 'static')
INSTALLED_AS = 'p3s_server_files'


class build_with_server_files(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, INSTALLED_AS)
        os.makedirs(target, exist_ok=True)
        for name in SERVER_FILES:
            if os.path.isdir(name):
                shutil.copytree(name, os.path.join(target, name), dirs_exist_ok=True)
            else:
                shutil.copy2(name, target)


setup(cmdclass={'build_py': build_with_server_files})
