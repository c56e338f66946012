"""ament_python build of the ism-edge ROS 2 node (``colcon build --packages-select ism_edge_ros``)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ism_edge_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
    ],
    # ism-edge comes from pip (README.md), not from here: a ROS workspace must not pull in
    # another numpy or OpenCV over the system's.
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ism-edge maintainers",
    maintainer_email="maintainers@users.noreply.b-seed-4849b353.example",
    description="ROS 2 node around the ism-edge adversarial defense runtime",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"defense_node = {PACKAGE}.node:main"]},
)
