"""Build step that ships ``mindformers_lora_ext_boot.pth`` and the tiny configs.

setuptools' ``data_files`` do not land in site-packages, so ``build_py`` copies the ``.pth``
to the root of the build (a normal wheel) or of the editable wheel (PEP 660). The name sorts
after ``__editable__*.pth`` so that an editable install's path hook runs first.
The tiny YAMLs under ``configs/tiny`` are copied into the package (``mindformers_lora_ext/
configs``) so that ``mindformers-lora demo`` finds them in a normal install; an editable
install reads them from the source tree.
"""
import glob
import os
import shutil

from setuptools.command.build_py import build_py

PTH_NAME = "mindformers_lora_ext_boot.pth"
PTH_LINE = "import mindformers_lora_ext._boot\n"
TINY_CONFIGS = os.path.join("configs", "tiny")


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the interpreter-start ``.pth`` file."""

    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        # An editable wheel is assembled in the install command's install_lib (its root);
        # build_lib is a scratch dir there whose unmapped files are dropped.
        root = self.distribution.get_command_obj("install").install_lib if editable else self.build_lib
        self.mkpath(root)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)
        if not editable:
            dest = os.path.join(self.build_lib, "mindformers_lora_ext", "configs")
            self.mkpath(dest)
            for path in sorted(glob.glob(os.path.join(TINY_CONFIGS, "*.yaml"))):
                shutil.copy2(path, dest)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        # In editable mode setuptools checks that every output maps to a source file;
        # the .pth has none, and listing it makes strict editable installs fail.
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
