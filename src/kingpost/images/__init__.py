"""Container images of Truss projects: the local Python base and project builds.

``build_image(config, app_dir, log)`` backs ``kingpost image build DIR``;
``ensure_base_image()`` backs ``kingpost image base``.
"""

from kingpost.images.base import BASE_PYTHON, base_image_tag, ensure_base_image
from kingpost.images.build import build_image, image_tag
from kingpost.images.dockerfile import BuildPlan, HostBuildEnv, image_python, plan_build

__all__ = [
    "BASE_PYTHON",
    "BuildPlan",
    "HostBuildEnv",
    "base_image_tag",
    "build_image",
    "ensure_base_image",
    "image_python",
    "image_tag",
    "plan_build",
]
